import sys

from sae_lens_attn.cli.main import main

sys.exit(main())

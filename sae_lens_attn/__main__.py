import sys

from sae_lens_attn.cli import main

sys.exit(main())

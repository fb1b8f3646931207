"""The ``sae-lens-attn`` command line: one module per subcommand, shared input parsing."""

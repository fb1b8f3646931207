"""Training attention SAEs: one model pass for many layers, and dead-feature resampling."""

"""moetune: tune and run the Triton fused-MoE kernel on the GPU you have."""

__version__ = "0.1.0"

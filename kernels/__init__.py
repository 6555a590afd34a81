"""gefx.kernels: fused Triton kernels for the engine ops (see kernels/README.md).

No kernel is implemented yet; the backend seam (gefx.backends) reads UNAVAILABLE and uses the
torch reference.
"""
UNAVAILABLE = "no Triton kernels are implemented yet"
OPS: dict = {}

"""Shared test set-up.

Triton reads TRITON_INTERPRET when a kernel is defined, so it is set here, before any test imports
gefx.kernels: without a CUDA device, Triton kernels run under the CPU interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

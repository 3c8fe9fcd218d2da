"""Strict test doubles of the GPU modules this machine cannot run: ``tensorrt`` and cuda-python's runtime."""

"""Triton backend of kernels/: same functions and signatures as kernels/reference (see NOTES.md)."""

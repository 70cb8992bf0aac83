"""Native CPU kernels (plain C through ctypes) for the CPU path of the paged cache."""

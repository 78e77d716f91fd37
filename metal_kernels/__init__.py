"""Metal kernel sources (``*.metal``), loaded by ``cheems_mlx.kernels``."""

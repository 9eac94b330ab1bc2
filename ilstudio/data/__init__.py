"""Episode files (ACT HDF5 layout) -> normalized training samples."""

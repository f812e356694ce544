"""The only package that imports mpi4py: RD-PSGD / D-PSGD's point-to-point exchange."""


def world_size() -> int:
    """Processes in MPI_COMM_WORLD (``mpi4py`` imported on first use)."""
    from mpi4py import MPI
    return MPI.COMM_WORLD.Get_size()

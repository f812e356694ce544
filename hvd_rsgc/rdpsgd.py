"""Public import path kept for users: ``from hvd_rsgc.rdpsgd import RDPSGD``. The code lives in
``hvd_rsgc/mpi/rdpsgd.py`` (the MPI backend)."""
from .mpi.rdpsgd import RDPSGD

__all__ = ["RDPSGD"]

"""``python -m hvd_rsgc.compare``: several compressors on one config (code in
``hvd_rsgc/app/compare.py``)."""
from .app.compare import main  # noqa: F401

if __name__ == "__main__":
    main()

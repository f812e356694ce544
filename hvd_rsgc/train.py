"""``python -m hvd_rsgc.train``: the training application's entry point (code in
``hvd_rsgc/app/train.py``)."""
from .app.train import main, run  # noqa: F401

if __name__ == "__main__":
    main()

"""``python -m sample_backend``: same as the ``sample-backend`` console script."""

from sample_backend.cli import main

if __name__ == "__main__":
    main()

"""``python -m eval.fvd`` (also ``accelerate launch -m eval.fvd``): see :mod:`eval.fvd.command`."""

from eval.fvd.command import main

if __name__ == "__main__":
    main()

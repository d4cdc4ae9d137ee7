"""``python -m gilas_conv``: the same as the ``gilas-conv`` command."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="gilas-conv")

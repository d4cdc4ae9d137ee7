"""The sender's implementation; the public names are in :mod:`gilas_conv.sender`.

``_base`` (no I/O) is shared; ``_async`` is the hand-written source and ``_sync`` is
generated from it by ``scripts/unasync.py``; ``_backend`` holds the few true differences.
"""

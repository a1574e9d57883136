"""The sync worker: regsync-format mirroring into the cache or another registry."""

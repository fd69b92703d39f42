"""The preprocessing run: LIDC root -> nodule crops, manifest and failures (workers, shards, resume) and its benchmark."""

"""Nodule crops as model inputs: views, MONAI transforms, patient-grouped folds, datasets, DataModule (the manifest: ctcdam.manifest)."""

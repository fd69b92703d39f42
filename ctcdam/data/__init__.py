"""Nodule crops as model inputs: manifest checks, views, MONAI transforms, patient-grouped folds, datasets, DataModule."""

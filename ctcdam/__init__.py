"""ctcdam: class-discriminative attention maps for ViTs on LIDC-IDRI lung-nodule CT."""
__version__ = "0.1.0"

"""ctcdam.lidc"""

"""ctcdam.export"""

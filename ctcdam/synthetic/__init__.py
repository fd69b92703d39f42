"""ctcdam.synthetic"""

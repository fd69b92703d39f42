"""ctcdam.data"""

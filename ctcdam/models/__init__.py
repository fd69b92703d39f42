"""ctcdam.models"""

"""The timm ViT (hub / file / none weights), its multi-task LightningModule, training callbacks, embedding cache, metrics and checkpoints."""

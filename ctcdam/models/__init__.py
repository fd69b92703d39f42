"""The timm ViT (hub / file / none weights), its multi-task LightningModule, embedding cache, metrics, checkpoints and training CLI."""

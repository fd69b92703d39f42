import time
def test_probe(demo_checkpoint):
    print("CKPT", demo_checkpoint)

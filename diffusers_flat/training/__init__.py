"""The training step, the data it reads, the UNet it trains and the checkpoints it writes."""

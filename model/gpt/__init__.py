"""The GPT itself: the network, sampling and beam search, loading pretrained weights."""

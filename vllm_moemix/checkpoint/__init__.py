"""The moemix safetensors checkpoint: its format constants and checks, reading and writing it shard by shard."""

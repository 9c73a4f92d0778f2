"""Data checks before any money is spent: datasets read and validated row by row,
token counts, the local model folder, and the bundle that ships them."""

"""Other model file formats: GGUF (llama.cpp, bitnet.cpp) import and export, and dense bf16 folders."""

#pragma once
// Placeholder for the decode engine's bindings (filled in by decode.cpp).
#define DECODE_METHODS

#include <gtest/gtest.h>
#include "tokenizer/pretokenize.h"

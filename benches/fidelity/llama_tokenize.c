// llama.cpp's token ids for a text file, by the GGUF's own tokenizer (vocab only, no weights), so
// both engines in benches/fidelity/smollm2.sh read the same ids:
//
//   llama_tokenize MODEL.gguf TEXT_FILE MAX_IDS [ADD_SPECIAL PARSE_SPECIAL]
//
// Prints up to MAX_IDS ids, comma-separated: by default with the tokenizer's own special tokens added
// as llama.cpp adds them to a prompt (ADD_SPECIAL 1) and special tokens' text read as text
// (PARSE_SPECIAL 0). tests/fixtures/make_bpe_vocab_fixtures.py passes 0 1 and 1 1 (a special
// token's text is that token, as a tokenizer.json's added tokens are). Exit 1 with one line on
// stderr on error.
#include <stdio.h>
#include <stdlib.h>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char *text, void *data) {
    (void)data;
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 6) {
        fprintf(stderr, "usage: %s MODEL.gguf TEXT_FILE MAX_IDS [ADD_SPECIAL PARSE_SPECIAL]\n", argv[0]);
        return 1;
    }
    FILE *f = fopen(argv[2], "rb");
    if (!f) {
        fprintf(stderr, "%s: cannot read\n", argv[2]);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc(len + 1);
    if (!text || fread(text, 1, len, f) != (size_t)len) {
        fprintf(stderr, "%s: cannot read\n", argv[2]);
        return 1;
    }
    text[len] = 0;
    fclose(f);
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.vocab_only = 1;
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "%s: llama.cpp could not load it\n", argv[1]);
        return 1;
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    int cap = (int)len + 16;
    llama_token *ids = malloc(sizeof(llama_token) * cap);
    int add_special = argc == 6 ? atoi(argv[4]) : 1, parse_special = argc == 6 ? atoi(argv[5]) : 0;
    int n = llama_tokenize(vocab, text, (int)len, ids, cap, add_special, parse_special);
    if (n < 0) {
        fprintf(stderr, "%s: llama_tokenize failed (%d)\n", argv[2], n);
        return 1;
    }
    int max = atoi(argv[3]);
    for (int i = 0; i < n && i < max; i++) printf(i ? ",%d" : "%d", ids[i]);
    printf("\n");
    return 0;
}

// gpt2-onnx's driver for llama.cpp: greedy generation from given token ids, timed step by step.
//
// The suite's other systems are called as run(prompt ids [B, L], new_tokens) -> the time of each step's
// tokens and the tokens; this program gives llama.cpp the same call through its C API (llama.h), so the
// suite can time it in its alternating rounds and compare its greedy tokens with PyTorch's. It follows
// llama.cpp's own examples/batched (one sequence id per row, logits only where a token is sampled).
//
//   gpt2-onnx-llama-run MODEL.gguf THREADS
//   stdin, one request per line:  NEW_TOKENS B L WANT_LOGITS id_0 ... id_{B*L-1}
//   stdout, one JSON line each:   {"times": [s, ...], "tokens": [[...], ...], "logits": [...],
//                                  "rss_mb": ..., "peak_rss_mb": ...}
//
// times[k] is seconds from the request to step k's tokens (step 0: the prefill); logits, when asked for,
// are row 0's after the prefill; rss_mb / peak_rss_mb are this process's VmRSS / VmHWM (the suite's memory
// probe runs in Python, and llama.cpp's memory is here). Built by benchmarks/llamacpp.py against the llama.cpp it benchmarks.
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "llama.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Shape {
    int batch = 0, cells = 0;  // a context serves `batch` sequences of up to `cells` tokens each
};

void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

double status_mb(const std::string & field) {  // VmRSS or VmHWM from /proc/self/status, in MiB
    std::ifstream status("/proc/self/status");
    for (std::string line; std::getline(status, line);)
        if (line.rfind(field + ":", 0) == 0) return std::stod(line.substr(field.size() + 1)) / 1024;
    return 0;
}

llama_token argmax(const float * logits, int n_vocab) {
    int best = 0;
    for (int i = 1; i < n_vocab; ++i) if (logits[i] > logits[best]) best = i;
    return best;
}

// The CPU backend's persistent thread pool, set up as llama-bench sets up its own (polling level 50):
// without one, ggml starts threads for every graph it computes.
ggml_threadpool * thread_pool(int threads) {
    auto * reg = ggml_backend_dev_backend_reg(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU));
    auto * make = (decltype(ggml_threadpool_new) *) ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_new");
    ggml_threadpool_params params = ggml_threadpool_params_default(threads);
    params.poll = 50;
    return make ? make(&params) : nullptr;
}

// A context sized for this request's shape (reused while the shape stays): B sequences, own KV cells each.
llama_context * context_for(llama_model * model, int threads, Shape want, Shape & have, llama_context * ctx,
                            ggml_threadpool * pool) {
    // reuse only while the prompt batch also fits n_batch, which is not rounded up with the cells
    if (ctx && want.batch == have.batch && want.cells <= have.cells &&
        want.batch * want.cells <= int(llama_n_batch(ctx))) return ctx;
    if (ctx) llama_free(ctx);
    llama_context_params params = llama_context_default_params();
    params.n_seq_max = want.batch;
    params.n_ctx = want.batch * want.cells;
    params.n_batch = params.n_ctx;
    params.n_threads = params.n_threads_batch = threads;
    ctx = llama_init_from_model(model, params);
    if (ctx && pool) llama_attach_threadpool(ctx, pool, nullptr);
    // llama.cpp rounds each sequence's cells up (to 256): a warm-up's context then serves the timed runs
    if (ctx) have = {want.batch, int(llama_n_ctx(ctx)) / want.batch};
    return ctx;
}

bool decode(llama_context * ctx, llama_batch & batch) {
    int rc = llama_decode(ctx, batch);
    if (rc != 0) fprintf(stderr, "llama_decode failed: %d\n", rc);
    return rc == 0;
}

void add(llama_batch & batch, llama_token token, llama_pos pos, llama_seq_id seq, bool output) {
    int i = batch.n_tokens++;
    batch.token[i] = token, batch.pos[i] = pos, batch.n_seq_id[i] = 1, batch.seq_id[i][0] = seq;
    batch.logits[i] = output;
}

}  // namespace

int main(int argc, char ** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL.gguf THREADS\n", argv[0]);
        return 2;
    }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) return fprintf(stderr, "cannot load %s\n", argv[1]), 1;
    const int threads = atoi(argv[2]);
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_context * ctx = nullptr;
    ggml_threadpool * pool = thread_pool(threads);
    Shape have;
    std::cout << "{\"ready\": true, \"n_vocab\": " << n_vocab << "}" << std::endl;

    for (std::string line; std::getline(std::cin, line);) {
        std::istringstream in(line);
        int new_tokens = 0, rows = 0, length = 0, want_logits = 0;
        in >> new_tokens >> rows >> length >> want_logits;
        std::vector<llama_token> ids(rows * length);
        for (auto & id : ids) in >> id;
        if (!in || new_tokens < 1 || rows < 1 || length < 1) return fprintf(stderr, "bad request: %s\n", line.c_str()), 2;
        ctx = context_for(model, threads, {rows, length + new_tokens}, have, ctx, pool);
        if (!ctx) return fprintf(stderr, "cannot create a context for %d x %d\n", rows, length + new_tokens), 1;
        llama_memory_clear(llama_get_memory(ctx), true);
        llama_batch batch = llama_batch_init(rows * length, 0, 1);

        // prefill: every row's prompt in one batch, logits at each row's last token
        auto start = std::chrono::steady_clock::now();
        std::vector<double> times;
        std::vector<std::vector<llama_token>> out(rows);
        std::vector<float> first_logits;
        batch.n_tokens = 0;
        for (int r = 0; r < rows; ++r)
            for (int i = 0; i < length; ++i) add(batch, ids[r * length + i], i, r, i == length - 1);
        if (!decode(ctx, batch)) return 1;
        for (int step = 0;; ++step) {
            // pick each row's token from the logits just computed, note the time
            for (int r = 0; r < rows; ++r) {
                const float * logits = llama_get_logits_ith(ctx, step == 0 ? r * length + length - 1 : r);
                out[r].push_back(argmax(logits, n_vocab));
                if (step == 0 && r == 0 && want_logits) first_logits.assign(logits, logits + n_vocab);
            }
            times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
            if (step + 1 == new_tokens) break;
            // decode step: each row's last token at its next position
            batch.n_tokens = 0;
            for (int r = 0; r < rows; ++r) add(batch, out[r].back(), length + step, r, true);
            if (!decode(ctx, batch)) return 1;
        }
        llama_batch_free(batch);

        std::ostringstream json;
        json.precision(9);
        json << "{\"times\": [";
        for (size_t i = 0; i < times.size(); ++i) json << (i ? ", " : "") << times[i];
        json << "], \"tokens\": [";
        for (int r = 0; r < rows; ++r) {
            json << (r ? ", [" : "[");
            for (size_t i = 0; i < out[r].size(); ++i) json << (i ? ", " : "") << out[r][i];
            json << "]";
        }
        json << "], \"logits\": [";
        for (size_t i = 0; i < first_logits.size(); ++i) json << (i ? ", " : "") << first_logits[i];
        json << "], \"rss_mb\": " << status_mb("VmRSS") << ", \"peak_rss_mb\": " << status_mb("VmHWM");
        std::cout << json.str() << "}" << std::endl;
    }
    if (ctx) llama_free(ctx);
    llama_model_free(model);
    return 0;
}

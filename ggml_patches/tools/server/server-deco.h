#pragma once

// DECO expert activity of the models a llama-server runs (patch 0013-server-deco-metrics): each model (the
// target, the draft) counts its own, per DECO layer, through ggml_deco_activity_eval (ggml-deco.h) installed as
// the eval callback of the contexts made for it, so a draft's tokens never enter the target's counts. /metrics
// reports them in Prometheus form and /props as JSON, with the weight bytes read per decoded token:
//
//     bytes/token = non-expert bytes + sum over DECO layers of (activation rate × that layer's expert bytes)
//
// (the token embedding counts one row unless the output head shares it; docs/deco.md, "Resource accounting").

#include "common.h"
#include "ggml-deco.h"
#include "json.h"
#include "llama.h"

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

class server_deco_activity {
public:
    explicit server_deco_activity(std::string role) : role(std::move(role)) {}

    // the contexts created from `params` count into this object (it must outlive them)
    void install(common_params & params);

    // size the counts for `model` (loaded from the GGUF at `path`) and read its weight bytes; counting starts
    // here, so the warm-up decode of context creation is not counted
    void attach(const llama_model * model, const std::string & path);

    bool attached() const;
    const std::string & name() const { return role; }

    struct layer_counts {
        int32_t layer;
        ggml_deco_layer_activity counts;
        int64_t n_expert;     // 0 until the layer was evaluated once
        uint64_t expert_bytes; // the layer's routed experts (up, gate, down), all of them
    };
    struct snapshot {
        std::vector<layer_counts> layers; // DECO layers only
        uint64_t other_bytes = 0;         // everything else read per token
        double bytes_per_token() const;   // at the activation counted so far (all experts where none yet)
        uint64_t dense_bytes_per_token() const;
    };
    snapshot read() const;

private:
    static bool eval(struct ggml_tensor * t, bool ask, void * user_data);

    std::string role;
    mutable std::mutex mutex; // the eval callback (the decoding thread) against the readers (HTTP threads)
    std::vector<ggml_deco_layer_activity> counts;
    std::vector<int64_t> n_expert;
    std::vector<uint64_t> expert_bytes;
    uint64_t other_bytes = 0;
    ggml_deco_activity activity = { 0, nullptr };
};

// /props: {"target": {...}, "draft": {...}} for the attached models
common_json server_deco_to_json(const std::vector<const server_deco_activity *> & models);

// /metrics: the llamacpp:deco_* families, one series per model and layer (empty without a DECO model)
std::string server_deco_to_prometheus(const std::vector<const server_deco_activity *> & models);

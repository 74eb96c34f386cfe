#include "server-deco.h"

#include "gguf.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <sstream>

bool server_deco_activity::eval(struct ggml_tensor * t, bool ask, void * user_data) {
    auto * self = static_cast<server_deco_activity *>(user_data);
    if (ask) {
        return ggml_deco_activity_eval(t, true, &self->activity); // the DECO ops of counted layers
    }
    std::lock_guard<std::mutex> lock(self->mutex);
    if (t->op == GGML_OP_DECO_MOE) {
        const int32_t layer = ggml_deco_moe_get_params(t).layer;
        if (layer >= 0 && layer < self->activity.n_layers) {
            self->n_expert[layer] = t->src[4]->ne[0]; // the router logits: one per expert
        }
    }
    return ggml_deco_activity_eval(t, false, &self->activity);
}

void server_deco_activity::install(common_params & params) {
    params.cb_eval           = eval;
    params.cb_eval_user_data = this;
}

// the per-layer expert bytes and the bytes of everything else, from the GGUF's tensor table
static void read_weight_bytes(const std::string & path, int64_t n_vocab, std::vector<uint64_t> & expert_bytes,
                              uint64_t & other_bytes) {
    gguf_init_params params = { /*.no_alloc =*/ true, /*.ctx =*/ nullptr };
    gguf_context * gguf = gguf_init_from_file(path.c_str(), params);
    if (gguf == nullptr) {
        return;
    }
    const bool tied = gguf_find_tensor(gguf, "output.weight") < 0;
    for (int64_t i = 0; i < gguf_get_n_tensors(gguf); ++i) {
        const char * name = gguf_get_tensor_name(gguf, i);
        const uint64_t size = gguf_get_tensor_size(gguf, i);
        int layer = -1;
        char kind[64] = {};
        if (sscanf(name, "blk.%d.%63[^.]", &layer, kind) == 2 && layer >= 0 && layer < (int) expert_bytes.size() &&
            (!strcmp(kind, "ffn_up_exps") || !strcmp(kind, "ffn_gate_exps") || !strcmp(kind, "ffn_down_exps"))) {
            expert_bytes[layer] += size;
        } else if (!strcmp(name, "token_embd.weight") && !tied) {
            other_bytes += size / std::max<int64_t>(n_vocab, 1); // looked up: one row per token
        } else {
            other_bytes += size;
        }
    }
    gguf_free(gguf);
}

void server_deco_activity::attach(const llama_model * model, const std::string & path) {
    const int32_t n_layer = llama_model_n_layer(model);
    std::lock_guard<std::mutex> lock(mutex);
    if ((int32_t) counts.size() != n_layer) { // a model loaded again after sleeping keeps its counts
        counts.assign(n_layer, ggml_deco_layer_activity{ 0, 0, -1, 0 });
        n_expert.assign(n_layer, 0);
        expert_bytes.assign(n_layer, 0);
        other_bytes = 0;
        read_weight_bytes(path, llama_vocab_n_tokens(llama_model_get_vocab(model)), expert_bytes, other_bytes);
    }
    activity = { n_layer, counts.data() };
}

bool server_deco_activity::attached() const {
    std::lock_guard<std::mutex> lock(mutex);
    return activity.n_layers > 0;
}

server_deco_activity::snapshot server_deco_activity::read() const {
    std::lock_guard<std::mutex> lock(mutex);
    snapshot s;
    s.other_bytes = other_bytes;
    for (size_t il = 0; il < counts.size(); ++il) {
        if (expert_bytes[il] > 0) { // a DECO layer: it has routed experts
            s.layers.push_back({ (int32_t) il, counts[il], n_expert[il], expert_bytes[il] });
        }
    }
    return s;
}

static double activation_rate(const server_deco_activity::layer_counts & l) {
    return l.counts.n_tokens > 0 && l.n_expert > 0 ? (double) l.counts.n_active / (double) (l.counts.n_tokens * l.n_expert)
                                                   : 0.0;
}

double server_deco_activity::snapshot::bytes_per_token() const {
    double bytes = (double) other_bytes;
    for (const auto & l : layers) {
        bytes += (l.counts.n_tokens > 0 ? activation_rate(l) : 1.0) * (double) l.expert_bytes;
    }
    return bytes;
}

uint64_t server_deco_activity::snapshot::dense_bytes_per_token() const {
    uint64_t bytes = other_bytes;
    for (const auto & l : layers) {
        bytes += l.expert_bytes;
    }
    return bytes;
}

common_json server_deco_to_json(const std::vector<const server_deco_activity *> & models) {
    common_json out = common_json::object();
    for (const auto * m : models) {
        if (!m->attached()) {
            continue;
        }
        const auto s = m->read();
        common_json layers = common_json::array();
        for (const auto & l : s.layers) {
            layers.push_back({
                { "layer",      l.layer },
                { "tokens",     l.counts.n_tokens },
                { "active",     l.counts.n_active },
                { "min_active", l.counts.n_tokens > 0 ? common_json(l.counts.min_active) : common_json(nullptr) },
                { "max_active", l.counts.n_tokens > 0 ? common_json(l.counts.max_active) : common_json(nullptr) },
                { "experts",    l.n_expert },
                { "rate",       activation_rate(l) },
            });
        }
        out[m->name()] = {
            { "layers",                       layers },
            { "weight_bytes_per_token",       s.bytes_per_token() },
            { "dense_weight_bytes_per_token", s.dense_bytes_per_token() },
        };
    }
    return out;
}

std::string server_deco_to_prometheus(const std::vector<const server_deco_activity *> & models) {
    std::vector<std::pair<std::string, server_deco_activity::snapshot>> snapshots;
    for (const auto * m : models) {
        if (m->attached()) {
            snapshots.emplace_back(m->name(), m->read());
        }
    }
    if (snapshots.empty() || std::all_of(snapshots.begin(), snapshots.end(), [](const auto & s) { return s.second.layers.empty(); })) {
        return ""; // no DECO model
    }
    std::ostringstream out;
    auto family = [&](const char * name, const char * type, const char * help) {
        out << "# HELP llamacpp:" << name << " " << help << "\n# TYPE llamacpp:" << name << " " << type << "\n";
    };
    auto per_layer = [&](const char * name, const char * type, const char * help, auto value) {
        family(name, type, help);
        for (const auto & [model, s] : snapshots) {
            for (const auto & l : s.layers) {
                out << "llamacpp:" << name << "{model=\"" << model << "\",layer=\"" << l.layer << "\"} " << value(l) << "\n";
            }
        }
    };
    auto per_model = [&](const char * name, const char * help, auto value) {
        family(name, "gauge", help);
        for (const auto & [model, s] : snapshots) {
            out << "llamacpp:" << name << "{model=\"" << model << "\"} " << value(s) << "\n";
        }
    };
    using layer = server_deco_activity::layer_counts;
    using snap  = server_deco_activity::snapshot;
    per_layer("deco_layer_tokens_total", "counter", "DECO: tokens routed through the layer",
              [](const layer & l) { return (double) l.counts.n_tokens; });
    per_layer("deco_layer_active_experts_total", "counter", "DECO: active experts summed over those tokens",
              [](const layer & l) { return (double) l.counts.n_active; });
    per_layer("deco_layer_experts", "gauge", "DECO: routed experts of the layer (0 before its first token)",
              [](const layer & l) { return (double) l.n_expert; });
    per_layer("deco_layer_activation", "gauge", "DECO: active experts / (tokens x experts) so far",
              [](const layer & l) { return activation_rate(l); });
    per_model("deco_weight_bytes_per_token", "DECO: weight bytes read per decoded token at the activation so far",
              [](const snap & s) { return s.bytes_per_token(); });
    per_model("deco_dense_weight_bytes_per_token", "DECO: weight bytes per token when every expert is read",
              [](const snap & s) { return (double) s.dense_bytes_per_token(); });
    return out.str();
}

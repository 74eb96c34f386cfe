// Where the model loader puts DECO expert weights for a CUDA device, checked without a GPU.
//
//   test-deco-placement MODEL.gguf [DEVICE]
//
// A stand-in GPU device is registered whose supports_op for GGML_OP_DECO_MOE is the CUDA backend's own
// (ggml-cuda/deco-moe-supported.h, plain C++) and which takes every other op, as CUDA does for a DECO graph of
// F32/F16/Q4_0/Q8_0 weights. The model is loaded with n_gpu_layers = 99 and no_alloc (metadata only: the
// loader decides every tensor's buffer type, reads no data) on that device, or on DEVICE (e.g. CUDA0: a real
// GPU, scripts/gpu-check.sh), then:
//   1. every expert tensor (ffn_{up,gate,down}_exps) must be in the device's buffer type;
//   2. the device must refuse a DECO node whose expert weights sit in the CPU_REPACK buffer (only the CPU reads
//      that layout, and it has no get_tensor to copy from), and take one whose weights are in host memory.
// Prints one line per expert tensor and "N passed, N failed"; exit status 1 on any failure.

#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-deco.h"
#include "llama.h"

#include "../ggml/src/ggml-backend-impl.h"
#include "../ggml/src/ggml-cuda/deco-moe-supported.h"
#include "../src/llama-model.h"

#include "deco-cpu-repack.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

static constexpr const char * DEVICE_NAME = "DECO_CUDA_LIMITS";

//
// the stand-in device: host memory, reported as a GPU's (not host-readable, like VRAM)
//

static void * dummy_get_base(ggml_backend_buffer_t buffer) {
    return buffer->context;
}

static void dummy_free(ggml_backend_buffer_t buffer) {
    free(buffer->context);
}

static ggml_backend_buffer_t dummy_alloc(ggml_backend_buffer_type_t buft, size_t size) {
    ggml_backend_buffer_i iface = {};
    iface.free_buffer = dummy_free;
    iface.get_base    = dummy_get_base;
    return ggml_backend_buffer_init(buft, iface, aligned_alloc(64, GGML_PAD(size + 1, 64)), size);
}

static const char * dummy_buft_name(ggml_backend_buffer_type_t) { return DEVICE_NAME; }
static size_t dummy_alignment(ggml_backend_buffer_type_t) { return 64; }

static ggml_backend_buffer_type g_buft = {
    /* .iface   = */ { dummy_buft_name, dummy_alloc, dummy_alignment, nullptr, nullptr, nullptr },
    /* .device  = */ nullptr,
    /* .context = */ nullptr,
};

static bool device_reads(ggml_backend_buffer_type_t buft) {
    return buft == &g_buft || ggml_backend_buft_is_host(buft);
}

static const char * dev_name(ggml_backend_dev_t) { return DEVICE_NAME; }
static void dev_memory(ggml_backend_dev_t, size_t * free, size_t * total) { *free = *total = (size_t) 80 << 30; }
static enum ggml_backend_dev_type dev_type(ggml_backend_dev_t) { return GGML_BACKEND_DEVICE_TYPE_GPU; }
static ggml_backend_buffer_type_t dev_buft(ggml_backend_dev_t) { return &g_buft; }
static bool dev_supports_buft(ggml_backend_dev_t, ggml_backend_buffer_type_t buft) { return buft == &g_buft; }

static void dev_props(ggml_backend_dev_t dev, ggml_backend_dev_props * props) {
    memset(props, 0, sizeof(*props));
    props->name        = DEVICE_NAME;
    props->description = DEVICE_NAME;
    props->type        = GGML_BACKEND_DEVICE_TYPE_GPU;
    dev_memory(dev, &props->memory_free, &props->memory_total);
}

static bool dev_supports_op(ggml_backend_dev_t, const ggml_tensor * op) {
    return op->op != GGML_OP_DECO_MOE || ggml_cuda_deco_moe_supports(op, device_reads);
}

static const char * reg_name(ggml_backend_reg_t) { return DEVICE_NAME; }
static size_t reg_count(ggml_backend_reg_t) { return 1; }
static ggml_backend_dev_t reg_device(ggml_backend_reg_t, size_t);

static ggml_backend_reg g_reg = { GGML_BACKEND_API_VERSION, { reg_name, reg_count, reg_device, nullptr }, nullptr };

static ggml_backend_device g_dev = {
    /* .iface = */ { dev_name, dev_name, dev_memory, dev_type, dev_props, nullptr, dev_buft, nullptr, nullptr,
                     dev_supports_op, dev_supports_buft, nullptr, nullptr, nullptr, nullptr },
    /* .reg     = */ &g_reg,
    /* .context = */ nullptr,
};

static ggml_backend_dev_t reg_device(ggml_backend_reg_t, size_t) { return &g_dev; }

//
// checks
//

static int n_passed = 0;
static int n_failed = 0;

static void check(const bool ok, const std::string & what) {
    (ok ? n_passed : n_failed)++;
    printf("%s: %s\n", ok ? "ok  " : "FAIL", what.c_str());
}

static bool is_expert_tensor(const std::string & name) {
    return name.find("_exps.weight") != std::string::npos;
}

// 1. the loader's choice for every expert tensor of the model, with all layers on dev
static void check_placement(const char * path, ggml_backend_dev_t dev) {
    llama_model_params mp = llama_model_default_params();
    ggml_backend_dev_t devices[] = { dev, nullptr };
    mp.devices      = devices;
    mp.n_gpu_layers = 99;
    mp.no_alloc     = true;
    llama_model * model = llama_model_load_from_file(path, mp);
    if (!model) {
        check(false, std::string("load ") + path);
        return;
    }
    int n_experts = 0;
    for (const auto & [name, t] : model->tensors_by_name) {
        if (!is_expert_tensor(name)) {
            continue;
        }
        ++n_experts;
        const char * buft = t->buffer ? ggml_backend_buft_name(ggml_backend_buffer_get_type(t->buffer)) : "(none)";
        check(t->buffer && ggml_backend_buffer_get_type(t->buffer) == ggml_backend_dev_buffer_type(dev),
              name + " " + ggml_type_name(t->type) + " [" + std::to_string(t->ne[0]) + ", " + std::to_string(t->ne[1]) +
              ", " + std::to_string(t->ne[2]) + "] in " + buft);
    }
    check(n_experts > 0, "the model has expert tensors (" + std::to_string(n_experts) + ")");
    llama_model_free(model);
}

// 2. a DECO node of the model's expert shape with its weights in the given buffer types
static bool device_takes_node(ggml_backend_buffer_type_t up_buft, ggml_backend_buffer_type_t down_buft, int64_t T) {
    constexpr int64_t d = 1792, De = 64, E = 102;
    ggml_init_params ip = { 16 * ggml_tensor_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * up     = ggml_new_tensor_3d(ctx, GGML_TYPE_Q4_0, d, De, E);
    ggml_tensor * down   = ggml_new_tensor_3d(ctx, GGML_TYPE_Q4_0, De, d, E);
    ggml_tensor * x      = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, d, T);
    ggml_tensor * logits = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, E, T);
    ggml_deco_moe_params p = { GGML_DECO_ACT_SILU, GGML_DECO_ROUTER_RELU, GGML_DECO_RNORM_NONE, GGML_DECO_BIAS_NONE, 1e-5f, 0, -1 };
    ggml_tensor * node = ggml_deco_moe(ctx, x, logits, up, nullptr, down, nullptr, nullptr, nullptr, nullptr, p);
    up->buffer   = ggml_backend_buft_alloc_buffer(up_buft, 0);
    down->buffer = ggml_backend_buft_alloc_buffer(down_buft, 0);
    const bool ok = ggml_backend_dev_supports_op(&g_dev, node);
    ggml_backend_buffer_free(up->buffer);
    ggml_backend_buffer_free(down->buffer);
    ggml_free(ctx);
    return ok;
}

static void check_weight_buffers() {
    ggml_backend_buffer_type_t cpu    = ggml_backend_dev_buffer_type(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU));
    ggml_backend_buffer_type_t repack = deco_repack_buffer_type();
    check(device_takes_node(&g_buft, &g_buft, 1), "node with up and down on the device, 1 token");
    check(device_takes_node(&g_buft, &g_buft, 16384), "node with up and down on the device, 16384 tokens");
    check(device_takes_node(&g_buft, cpu, 512), "node with down in host memory (copied by the scheduler)");
    if (repack) {
        check(!device_takes_node(&g_buft, repack, 512), "node with down in CPU_REPACK refused");
        check(!device_takes_node(repack, &g_buft, 1), "node with up in CPU_REPACK refused");
    } else {
        printf("(this CPU has no CPU_REPACK buffer)\n");
    }
}

int main(int argc, char ** argv) {
    if (argc != 2 && argc != 3) {
        fprintf(stderr, "usage: %s MODEL.gguf [DEVICE]\n", argv[0]);
        return 2;
    }
    llama_log_set([](ggml_log_level level, const char * text, void *) {
        if (level >= GGML_LOG_LEVEL_WARN) {
            fputs(text, stderr);
        }
    }, nullptr);
    llama_backend_init();
    g_buft.device = &g_dev;
    ggml_backend_device_register(&g_dev);

    ggml_backend_dev_t dev = argc == 3 ? ggml_backend_dev_by_name(argv[2]) : &g_dev;
    if (!dev) {
        fprintf(stderr, "error: no device %s\n", argv[2]);
        return 2;
    }
    check_placement(argv[1], dev);
    check_weight_buffers();

    printf("%d passed, %d failed\n", n_passed, n_failed);
    llama_backend_free();
    return n_failed == 0 ? 0 : 1;
}

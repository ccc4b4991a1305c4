#include "plan_glue.h"

#include <algorithm>
#include <cstdio>
#include <sstream>

#include "core/error.h"

namespace shardlm {
namespace {

// format_bytes always says GiB; small models need finer units.
std::string fmt_bytes(uint64_t b) {
  const double x = static_cast<double>(b);
  char buf[48];
  if (b >= (1ull << 30)) return format_bytes(b);
  if (b >= (1ull << 20)) std::snprintf(buf, sizeof buf, "%.2f MiB", x / (1 << 20));
  else std::snprintf(buf, sizeof buf, "%.1f KiB", x / 1024);
  return buf;
}

std::string rank_line(const DevicePlan& d) {
  return cat(d.name, " needs ", fmt_bytes(d.total_bytes), " (weights ", fmt_bytes(d.weight_bytes), ", KV ",
             fmt_bytes(d.kv_bytes), ", workspace ", fmt_bytes(d.workspace_bytes), "), has ",
             fmt_bytes(d.capacity_bytes));
}

}  // namespace

ModelDesc model_desc_from_source(const ModelSource& src) {
  ModelDesc m;
  m.config = src.config();
  m.source = src.path();
  for (const SourceTensor& st : src.tensors()) {
    TensorDesc t;
    t.name = st.name;
    t.type = st.type;
    // Collapse to the loader's 2-D view: ne0 and the product of the rest; 3-D experts stay 3-D (the loader
    // takes each expert as a matrix of its own).
    t.ne = {st.ne[0], st.ne[1] * st.ne[2] * st.ne[3]};
    if (st.n_dims == 3 && st.ne[3] == 1) t.ne = {st.ne[0], st.ne[1], st.ne[2]};
    if (st.n_dims <= 1 && t.ne[1] == 1) t.ne.resize(1);
    t.n_bytes = st.n_bytes;
    t.layer = tensor_layer(t.name, m.config.n_layer, src.path());
    m.tensors.push_back(std::move(t));
  }
  if (m.find("token_embd.weight") == nullptr) fail(src.path(), ": tensor 'token_embd.weight' is missing");
  if (m.find("output.weight") == nullptr) m.config.tied_output = true;
  return m;
}

RunPlan plan_run(const ModelDesc& m, const RunPlanRequest& req) {
  DeviceRequest dreq;
  dreq.cpu_mem = req.cpu_mem;
  dreq.cpu_cores = req.cpu_cores;
  dreq.cpu_bandwidth_gbs = req.cpu_bandwidth_gbs;
  dreq.cpu_bandwidth_measured = req.cpu_bandwidth_gbs.has_value();  // bench's own copy of this host
  dreq.cpu_kernels = req.cpu_kernels;
  DeviceInventory inv = make_inventory(dreq, nullptr);
  inv.gpus.clear();  // the CPU product: every rank is a CPU process of this host
  if (inv.cpu.capacity_bytes == 0) fail("the RAM of this machine is unknown: give --cpu-mem (e.g. 16G)");

  PlanRequest pr;
  pr.ctx = req.ctx;
  pr.batch = std::max<int64_t>(1, std::min(req.batch, req.ctx));
  pr.kv_type = req.kv_type;
  pr.max_num_seqs = std::max<int64_t>(1, req.max_num_seqs);
  pr.layer_split = req.layer_split;
  pr.expert_parallel = req.expert_parallel;
  const bool pinned = req.tp || req.pp;
  std::vector<std::pair<int, int>> layouts;  // (tp, pp) to evaluate when pinned or launched
  if (pinned) {
    layouts.emplace_back(req.tp.value_or(1), req.pp.value_or(1));
  } else if (req.world_size > 1) {
    for (int tp = 1; tp <= req.world_size; ++tp)
      if (req.world_size % tp == 0) layouts.emplace_back(tp, req.world_size / tp);
  }
  Plan plan;
  if (layouts.empty()) {
    plan = make_plan(m, inv, pr);
  } else {
    // Every layout the user (or the launcher's world size) allows; the best fitting one wins, else the
    // closest miss. Layouts the model cannot take (tp splitting heads, pp above the layers) are skipped
    // unless pinned, where make_plan's Error names the flag.
    std::optional<Plan> best;
    std::string why;
    for (auto [tp, pp] : layouts) {
      PlanRequest r = pr;
      r.tp = tp;
      r.pp = pp;
      if (!r.layer_split.empty() && static_cast<int>(r.layer_split.size()) != pp) continue;
      Plan p;
      try {
        DeviceInventory one = inv;
        one.cpu_cores = std::max(inv.cpu_cores, tp * pp);  // pinned layouts may oversubscribe the cores
        p = make_plan(m, one, r);
      } catch (const Error& e) {
        if (pinned) throw;
        why = e.what();
        continue;
      }
      const auto rank = [](const Plan& x) { return std::make_pair(x.fits, x.chosen.decode_tps); };
      if (!best || rank(p) > rank(*best)) best = std::move(p);
    }
    if (!best) fail("no layout of ", req.world_size, " ranks can split this model: ", why);
    plan = std::move(*best);
  }

  RunPlan out;
  out.plan = plan;
  out.tp = plan.chosen.layout.tp;
  out.pp = plan.chosen.layout.pp;
  const int world = out.tp * out.pp;
  const uint64_t reserve = inv.cpu.capacity_bytes - std::min(inv.cpu.capacity_bytes, [&] {
    uint64_t cap = 0;
    for (const DevicePlan& d : plan.chosen.devices) cap += d.capacity_bytes;
    return cap;
  }());
  const std::string ram = cat(fmt_bytes(inv.cpu.capacity_bytes), " of RAM", req.cpu_mem ? " (--cpu-mem)" : "",
                              ", ", fmt_bytes(reserve), " kept for the system, the rest shared by ", world,
                              " rank(s)");
  const DevicePlan* busiest = nullptr;
  for (const DevicePlan& d : plan.chosen.devices)
    if (!busiest || d.total_bytes > busiest->total_bytes) busiest = &d;
  if (!plan.fits) {
    std::ostringstream os;
    os << "tp " << out.tp << " x pp " << out.pp << (pinned ? "" : " (the best layout the planner found)")
       << " does not fit " << ram << ", context " << pr.ctx << ", KV " << type_name(pr.kv_type) << ":";
    for (const DevicePlan& d : plan.chosen.devices)
      if (!d.fits) os << "\n  " << rank_line(d);
    if (plan.max_context > 0) os << "\n  a context of at most " << plan.max_context << " tokens fits (-c)";
    os << "\n  (`shardlm plan -m MODEL --cpu-mem ...` explains; more RAM or a smaller quantization helps)";
    fail(os.str());
  }
  out.summary = cat("plan: CPU tp ", out.tp, " x pp ", out.pp, pinned ? " (given)" : " (chosen)", ", ",
                    busiest ? rank_line(*busiest) : std::string(), "; ", ram);
  return out;
}

}  // namespace shardlm

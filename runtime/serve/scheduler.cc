#include "runtime/serve/scheduler.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_format.h"

namespace quantkv {
namespace {

absl::Status ValidateConfig(const SchedulerConfig& c) {
  if (c.pools.empty()) return absl::InvalidArgumentError("SchedulerConfig.pools is empty");
  for (size_t i = 0; i < c.pools.size(); ++i) {
    const KvPoolConfig& p = c.pools[i];
    if (p.n_blocks <= 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("SchedulerConfig.pools[%d].n_blocks must be > 0, got %d", i, p.n_blocks));
    }
    if (p.block_tokens <= 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "SchedulerConfig.pools[%d].block_tokens must be > 0, got %d", i, p.block_tokens));
    }
    for (size_t j = 0; j < i; ++j) {
      if (c.pools[j].name == p.name) {
        return absl::InvalidArgumentError(
            absl::StrFormat("SchedulerConfig.pools[%d].name '%s' repeats pools[%d]", i, p.name, j));
      }
    }
  }
  if (c.max_running <= 0) {
    return absl::InvalidArgumentError("SchedulerConfig.max_running must be > 0");
  }
  // Every running sequence decodes every step, so the budget must cover all of them.
  if (c.max_step_tokens < c.max_running) {
    return absl::InvalidArgumentError(
        absl::StrFormat("SchedulerConfig.max_step_tokens (%d) must be >= max_running (%d)",
                        c.max_step_tokens, c.max_running));
  }
  if (c.max_queued <= 0) {
    return absl::InvalidArgumentError("SchedulerConfig.max_queued must be > 0");
  }
  if (c.max_context <= 0) {
    return absl::InvalidArgumentError("SchedulerConfig.max_context must be > 0");
  }
  return absl::OkStatus();
}

}  // namespace

int64_t StepPlan::total_tokens() const {
  int64_t n = 0;
  for (const SeqWork& w : items) n += w.n_tokens;
  return n;
}

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(const SchedulerConfig& config) {
  if (absl::Status s = ValidateConfig(config); !s.ok()) return s;
  return std::unique_ptr<Scheduler>(new Scheduler(config));
}

Scheduler::Scheduler(const SchedulerConfig& config) : config_(config) {
  for (const KvPoolConfig& p : config_.pools) free_blocks_.push_back(p.n_blocks);
}

int64_t Scheduler::BlocksFor(int pool, int64_t n_tokens) const {
  const int64_t bt = config_.pools[pool].block_tokens;
  return (n_tokens + bt - 1) / bt;
}

int64_t Scheduler::HeldFor(const SeqState& s, int64_t n_tokens) const {
  return BlocksFor(s.spec.pool, n_tokens) - s.floor_blocks / 2;
}

bool Scheduler::RequantizeOnePair(int pool, StepPlan& plan) {
  const int64_t bt = config_.pools[pool].block_tokens;
  for (uint64_t id : running_) {  // oldest first: its blocks are the oldest
    SeqState& s = seqs_.at(id);
    if (s.spec.pool != pool) continue;
    // Only blocks whose tokens are written (committed) are encoded and can be re-encoded.
    if (s.computed_tokens / bt - s.floor_blocks < 2) continue;
    s.floor_blocks += 2;
    s.blocks -= 1;
    free_blocks_[pool] += 1;
    requantized_blocks_ += 2;
    if (!plan.requantize.empty() && plan.requantize.back().id == id) {
      ++plan.requantize.back().pairs;
    } else {
      plan.requantize.push_back({.id = id, .pairs = 1});
    }
    return true;
  }
  return false;
}

absl::Status Scheduler::Submit(const RequestSpec& spec) {
  if (spec.pool < 0 || spec.pool >= static_cast<int>(config_.pools.size())) {
    return absl::InvalidArgumentError(absl::StrFormat("RequestSpec.pool %d is unknown (%d pools)",
                                                      spec.pool, config_.pools.size()));
  }
  if (spec.prompt_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("RequestSpec.prompt_tokens must be > 0, got %d", spec.prompt_tokens));
  }
  if (spec.max_new_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("RequestSpec.max_new_tokens must be > 0, got %d", spec.max_new_tokens));
  }
  // Written this way so that huge values cannot overflow the sum.
  if (spec.prompt_tokens > config_.max_context - spec.max_new_tokens) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "RequestSpec.prompt_tokens (%d) + max_new_tokens (%d) exceeds max_context (%d)",
        spec.prompt_tokens, spec.max_new_tokens, config_.max_context));
  }
  // The last sampled token is never fed back, so a sequence writes at most
  // prompt + max_new - 1 tokens, also when it recomputes after a preemption.
  const KvPoolConfig& pool = config_.pools[spec.pool];
  const int64_t peak = BlocksFor(spec.pool, spec.prompt_tokens + spec.max_new_tokens - 1);
  if (peak > pool.n_blocks) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "RequestSpec.prompt_tokens + max_new_tokens: %d tokens need %d blocks, but pool %d "
        "('%s') has only n_blocks=%d of %d tokens",
        spec.prompt_tokens + spec.max_new_tokens - 1, peak, spec.pool, pool.name, pool.n_blocks,
        pool.block_tokens));
  }
  // An id cancelled while in the outstanding plan is still referenced by that plan.
  if (seqs_.contains(spec.id) || cancelled_in_flight_.contains(spec.id)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("RequestSpec.id %d is already queued or running", spec.id));
  }
  if (queued_ >= config_.max_queued) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("request queue is full (%d waiting, max_queued=%d); retry later", queued_,
                        config_.max_queued));
  }
  SeqState s;
  s.spec = spec;
  s.prefill_tokens = spec.prompt_tokens;
  seqs_.emplace(spec.id, s);
  queue_[spec.priority].push_back(spec.id);
  ++queued_;
  return absl::OkStatus();
}

StepPlan Scheduler::Schedule() {
  if (outstanding_) {
    StepPlan plan = *outstanding_;
    std::erase_if(plan.items,
                  [&](const SeqWork& w) { return cancelled_in_flight_.contains(w.id); });
    return plan;
  }
  StepPlan plan;
  plan.step = next_step_++;
  int64_t budget = config_.max_step_tokens;
  ScheduleDecodes(plan, budget);
  ScheduleContinuedPrefills(plan, budget);
  // Blocks were short this step: admitting now would only thrash (the preempted sequences
  // sit at the front of the queue and would be readmitted into the same shortage).
  if (plan.preempted.empty()) Admit(plan, budget);
  if (!plan.items.empty()) outstanding_ = plan;
  return plan;
}

void Scheduler::ScheduleDecodes(StepPlan& plan, int64_t& budget) {
  // Oldest first, so a victim (taken from the newest end) never already has an item.
  size_t i = 0;
  while (i < running_.size()) {
    SeqState& s = seqs_.at(running_[i]);
    if (!s.prefill_done()) {
      ++i;
      continue;
    }
    const int pool = s.spec.pool;
    const int64_t need = HeldFor(s, s.computed_tokens + 1) - s.blocks;
    bool self_preempted = false;
    while (need > free_blocks_[pool]) {
      // Lower precision for old blocks before losing a sequence's work.
      if (config_.pools[pool].elastic && RequantizeOnePair(pool, plan)) continue;
      // The newest running sequence of the same pool; only those free useful blocks.
      size_t v = running_.size() - 1;
      while (seqs_.at(running_[v]).spec.pool != pool) --v;  // stops at i at the latest
      const uint64_t victim = running_[v];
      Preempt(victim, plan);
      if (victim == s.spec.id) {
        self_preempted = true;
        break;
      }
    }
    if (self_preempted) continue;  // running_[i] is now the next sequence
    if (need > 0) {
      free_blocks_[pool] -= need;
      s.blocks += need;
    }
    plan.items.push_back({.id = s.spec.id,
                          .pool = pool,
                          .start_pos = s.computed_tokens,
                          .n_tokens = 1,
                          .prefill = false,
                          .samples = true});
    --budget;  // cannot go negative: max_step_tokens >= max_running
    ++i;
  }
}

void Scheduler::ScheduleContinuedPrefills(StepPlan& plan, int64_t& budget) {
  for (uint64_t id : running_) {
    if (budget <= 0) return;
    const SeqState& s = seqs_.at(id);
    if (s.prefill_done()) continue;
    // Its blocks for the whole prefill were taken at admission.
    const int64_t n = std::min(budget, s.prefill_tokens - s.computed_tokens);
    plan.items.push_back({.id = id,
                          .pool = s.spec.pool,
                          .start_pos = s.computed_tokens,
                          .n_tokens = n,
                          .prefill = true,
                          .samples = s.computed_tokens + n == s.prefill_tokens});
    budget -= n;
  }
}

void Scheduler::Admit(StepPlan& plan, int64_t& budget) {
  while (budget > 0 && queued_ > 0 && static_cast<int64_t>(running_.size()) < config_.max_running) {
    auto level = queue_.begin();
    const uint64_t id = level->second.front();
    SeqState& s = seqs_.at(id);
    const int pool = s.spec.pool;
    const int64_t need = BlocksFor(pool, s.prefill_tokens);
    // Strict order: the head waits for blocks and nobody overtakes it, so a big request
    // is not starved by a stream of small ones.
    if (need > free_blocks_[pool]) return;
    level->second.pop_front();
    if (level->second.empty()) queue_.erase(level);
    --queued_;
    free_blocks_[pool] -= need;
    s.blocks = need;
    s.status = SeqStatus::kRunning;
    s.computed_tokens = 0;
    s.admit_order = next_admit_++;
    running_.push_back(id);
    const int64_t n = std::min(budget, s.prefill_tokens);
    plan.items.push_back({.id = id,
                          .pool = pool,
                          .start_pos = 0,
                          .n_tokens = n,
                          .prefill = true,
                          .samples = n == s.prefill_tokens});
    budget -= n;
  }
}

void Scheduler::Preempt(uint64_t id, StepPlan& plan) {
  SeqState& s = seqs_.at(id);
  Release(s);
  s.status = SeqStatus::kQueued;
  s.computed_tokens = 0;
  // Recompute: the tokens generated so far become part of the new prefill.
  s.prefill_tokens = s.spec.prompt_tokens + s.generated_tokens;
  ++s.preemptions;
  ++preemptions_;
  // Its blocks are gone: nothing of it is left to requantize.
  std::erase_if(plan.requantize, [id](const SeqRequantize& r) { return r.id == id; });
  queue_[s.spec.priority].push_front(id);
  ++queued_;
  plan.preempted.push_back(id);
}

void Scheduler::Release(SeqState& s) {
  free_blocks_[s.spec.pool] += s.blocks;
  s.blocks = 0;
  s.floor_blocks = 0;
  std::erase(running_, s.spec.id);
}

void Scheduler::RemoveQueued(const SeqState& s) {
  auto level = queue_.find(s.spec.priority);
  std::erase(level->second, s.spec.id);
  if (level->second.empty()) queue_.erase(level);
  --queued_;
}

absl::Status Scheduler::Commit(const StepPlan& plan, absl::Span<const SeqResult> results) {
  if (!outstanding_) {
    if (plan.items.empty() && results.empty()) return absl::OkStatus();
    return absl::InvalidArgumentError(
        absl::StrFormat("Commit of step %d, but no plan is outstanding", plan.step));
  }
  if (plan.step != outstanding_->step) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "Commit of step %d, but step %d is outstanding", plan.step, outstanding_->step));
  }
  // Validate everything before changing anything.
  absl::flat_hash_map<uint64_t, bool> finished;  // id -> reported finished
  for (const SeqResult& r : results) {
    const bool sampling = std::any_of(outstanding_->items.begin(), outstanding_->items.end(),
                                      [&](const SeqWork& w) { return w.id == r.id && w.samples; });
    if (!sampling) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "SeqResult for id %d, which has no sampling item in step %d", r.id, plan.step));
    }
    if (!finished.emplace(r.id, r.finished).second) {
      return absl::InvalidArgumentError(
          absl::StrFormat("two SeqResults for id %d in step %d", r.id, plan.step));
    }
  }
  for (const SeqWork& w : outstanding_->items) {
    if (w.samples && !finished.contains(w.id) && !cancelled_in_flight_.contains(w.id)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("no SeqResult for id %d, which sampled in step %d", w.id, plan.step));
    }
  }
  for (const SeqWork& w : outstanding_->items) {
    if (cancelled_in_flight_.contains(w.id)) continue;
    SeqState& s = seqs_.at(w.id);
    s.computed_tokens += w.n_tokens;
    if (!w.samples) continue;
    ++s.generated_tokens;
    if (finished.at(w.id) || s.generated_tokens >= s.spec.max_new_tokens) {
      Release(s);
      seqs_.erase(w.id);
      ++finished_;
    }
  }
  outstanding_.reset();
  cancelled_in_flight_.clear();
  return absl::OkStatus();
}

absl::Status Scheduler::Cancel(uint64_t id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) {
    return absl::NotFoundError(absl::StrFormat("no queued or running request %d", id));
  }
  SeqState& s = it->second;
  if (s.status == SeqStatus::kQueued) {
    RemoveQueued(s);
  } else {
    Release(s);
    if (outstanding_ && std::any_of(outstanding_->items.begin(), outstanding_->items.end(),
                                    [&](const SeqWork& w) { return w.id == id; })) {
      cancelled_in_flight_.insert(id);
    }
  }
  seqs_.erase(it);
  ++cancelled_;
  return absl::OkStatus();
}

const SeqState* Scheduler::Find(uint64_t id) const {
  auto it = seqs_.find(id);
  return it == seqs_.end() ? nullptr : &it->second;
}

SchedulerStats Scheduler::Stats() const {
  SchedulerStats st;
  st.running = static_cast<int64_t>(running_.size());
  st.queued = queued_;
  for (size_t i = 0; i < config_.pools.size(); ++i) {
    const KvPoolConfig& p = config_.pools[i];
    st.pools.push_back({.name = p.name,
                        .n_blocks = p.n_blocks,
                        .blocks_used = p.n_blocks - free_blocks_[i],
                        .blocks_free = free_blocks_[i]});
  }
  st.preemptions = preemptions_;
  st.requantized_blocks = requantized_blocks_;
  st.finished = finished_;
  st.cancelled = cancelled_;
  return st;
}

}  // namespace quantkv

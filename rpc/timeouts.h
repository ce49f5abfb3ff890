// Every wait of the cluster's control plane, named once with its default. The first four are
// flags (seconds on the command line: cli/options.h declares them for every program), which the
// coordinator passes on to the workers it starts; the rest are fixed.
#pragma once

#include <chrono>

namespace gemma2 {

using namespace std::chrono_literals;

struct ClusterTimeouts {
  // --startup-timeout: every rank ready (coordinator); the coordinator's first word once this
  // rank is ready (worker).
  std::chrono::milliseconds startup = 120s;
  // --step-timeout: a step's answers from every rank (coordinator); sending a step's result, and
  // every wait of the collectives and of the control-plane store (worker).
  std::chrono::milliseconds step = 60s;
  // --heartbeat-timeout: an idle rank's answer to a heartbeat (coordinator); the coordinator's
  // silence after which a rank leaves (worker).
  std::chrono::milliseconds heartbeat = 10s;
  // --connect-timeout: how long a worker keeps trying to reach the coordinator (a worker started
  // by a job scheduler may come up before the coordinator listens).
  std::chrono::milliseconds connect = 60s;

  // Between steps each rank is asked for a heartbeat this often.
  std::chrono::milliseconds heartbeat_interval = 1s;
  // A control message outside a step: store values, KV capacities, a rank's error report.
  std::chrono::milliseconds control_send = 10s;
  // Goodbyes: the shutdown message to a worker, a failing worker's last error report.
  std::chrono::milliseconds goodbye_send = 2s;
  // The shutdown sent to the survivors when a rank fails (short: the failing step waits on it).
  std::chrono::milliseconds failure_send = 200ms;
  // After a rank reports a failed collective, how long the others' channels may take to show
  // the rank that died (the one the error then names).
  std::chrono::milliseconds blame_grace = 2s;
  // A worker's exit after its shutdown message, before SIGKILL.
  std::chrono::milliseconds stop_grace = 3s;
  // A worker's pause between attempts to reach the coordinator.
  std::chrono::milliseconds connect_retry = 250ms;
};

}  // namespace gemma2

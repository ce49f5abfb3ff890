// gemma2-run and gemma2-make-checkpoint as a user runs them: JSON out, one-line errors.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdlib>
#include <sstream>
#include <fstream>
#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <regex>

#include "tests/cluster_util.h"
#include "tests/reference_util.h"
#include "tests/test_files.h"

namespace gemma2 {
namespace {

struct ProcessResult {
  int code;
  std::string out, err;
};

ProcessResult Exec(const std::string& args) {
  static int n = 0;
  const std::string err_file =
      ::testing::TempDir() + "/cli_err_" + std::to_string(getpid()) + "_" + std::to_string(++n);
  const std::string cmd = std::string(GEMMA2_BINARY_DIR) + "/bin/" + args + " 2>" + err_file;
  ProcessResult r{};
  FILE* p = popen(cmd.c_str(), "r");
  std::array<char, 4096> buf{};
  size_t got;
  while ((got = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), got);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(err_file);
  r.err.assign(std::istreambuf_iterator<char>(in), {});
  std::remove(err_file.c_str());
  return r;
}

class CliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    const std::string corpus = std::string(GEMMA2_SOURCE_DIR) + "/tools/demo_corpus.txt";
    const ProcessResult a = Exec("gemma2-make-checkpoint --out " + (dir_->path() / "lm").string() +
                                 " --corpus " + corpus + " --seed 3");
    ASSERT_EQ(a.code, 0) << a.err;
    const ProcessResult b = Exec("gemma2-make-checkpoint --out " + (dir_->path() / "ids").string() +
                                 " --vocab 50 --seed 4 --shards 2");
    ASSERT_EQ(b.code, 0) << b.err;
    const ProcessResult c = Exec("gemma2-make-checkpoint --out " + (dir_->path() / "cls").string() +
                                 " --vocab 50 --arch tokcls --labels 3");
    ASSERT_EQ(c.code, 0) << c.err;
    const ProcessResult s =
        Exec("gemma2-make-checkpoint --out " + (dir_->path() / "seqcls").string() +
             " --vocab 50 --arch seqcls --labels 2");
    ASSERT_EQ(s.code, 0) << s.err;
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string Model(const char* name) {
    return " --model " + (dir_->path() / name).string();
  }
  static testing::TempDir* dir_;
};
testing::TempDir* CliTest::dir_ = nullptr;

TEST_F(CliTest, TextPromptBatchAndLogitsContract) {
  const ProcessResult r =
      Exec("gemma2-run" + Model("lm") + " --prompt 'Hello world' --max-new-tokens 5 --logits");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  const size_t prompt = j["prompt_ids"].size();
  EXPECT_EQ(j["prompt_ids"][0], 2);  // <bos>
  EXPECT_EQ(j["generated_ids"].size(), 5u);
  EXPECT_EQ(j["logits"].size(), prompt + 5 - 1);
  EXPECT_TRUE(j["text"].is_string());
  const ProcessResult tp2 =
      Exec("gemma2-run" + Model("lm") + " --prompt 'Hello world' --max-new-tokens 5 --tp 2");
  ASSERT_EQ(tp2.code, 0) << tp2.err;
  EXPECT_EQ(nlohmann::json::parse(tp2.out)["generated_ids"], j["generated_ids"]);

  const ProcessResult batch =
      Exec("gemma2-run" + Model("lm") + " --prompts-file " + GEMMA2_SOURCE_DIR +
           "/tools/demo_prompts.txt --max-new-tokens 3");
  ASSERT_EQ(batch.code, 0) << batch.err;
  EXPECT_EQ(std::count(batch.out.begin(), batch.out.end(), '\n'), 4);
  const ProcessResult chat =
      Exec("gemma2-run" + Model("lm") + " --chat --prompt Hi --max-new-tokens 2");
  ASSERT_EQ(chat.code, 0) << chat.err;
  EXPECT_EQ(nlohmann::json::parse(chat.out)["prompt_ids"][1], 4);  // the demo's <start_of_turn>
  const ProcessResult sampled =
      Exec("gemma2-run" + Model("lm") +
           " --prompt Hi --temperature 0.8 --top-k 20 --top-p 0.9 --seed 5");
  const ProcessResult again =
      Exec("gemma2-run" + Model("lm") +
           " --prompt Hi --temperature 0.8 --top-k 20 --top-p 0.9 --seed 5");
  ASSERT_EQ(sampled.code, 0) << sampled.err;
  EXPECT_EQ(sampled.out, again.out);
  // Vocab-parallel picking (each rank's shard, then the best of the ranks) draws what one rank
  // draws from the whole row: greedy above, and temperature sampling here.
  for (const char* tp : {" --tp 2", " --tp 4"}) {
    const ProcessResult split =
        Exec("gemma2-run" + Model("lm") +
             " --prompt Hi --temperature 8 --seed 5 --max-new-tokens 12" + tp);
    const ProcessResult whole = Exec("gemma2-run" + Model("lm") +
                                     " --prompt Hi --temperature 8 --seed 5 --max-new-tokens 12");
    ASSERT_EQ(split.code, 0) << split.err;
    EXPECT_EQ(split.out, whole.out) << tp;
  }
}

TEST_F(CliTest, TokenIdsWithoutTokenizerAndClassifier) {
  const ProcessResult r =
      Exec("gemma2-run" + Model("ids") + " --prompt-ids 2,5,9 --max-new-tokens 2");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_TRUE(j["text"].is_null());
  const ProcessResult p =
      Exec("gemma2-run" + Model("ids") + " --prompt-ids 2,5 --max-new-tokens 1 --progress --tp 2");
  ASSERT_EQ(p.code, 0) << p.err;
  EXPECT_NE(p.err.find("gemma2-run: loading"), std::string::npos) << p.err;
  EXPECT_NE(p.err.find("68 / 68 tensors"), std::string::npos)
      << p.err;  // 2 ranks x (2 + 4 layers x 8)
  EXPECT_EQ(p.err.back(), '\n');
  const ProcessResult c = Exec("gemma2-run" + Model("cls") + " --prompt-ids 2,5,9,11");
  ASSERT_EQ(c.code, 0) << c.err;
  // A sequence classifier has no score.bias: its progress still ends at every tensor counted.
  const ProcessResult s = Exec("gemma2-run" + Model("seqcls") + " --prompt-ids 2,5,9 --progress");
  ASSERT_EQ(s.code, 0) << s.err;
  std::smatch done;
  ASSERT_TRUE(std::regex_search(s.err, done, std::regex(R"((\d+) / (\d+) tensors[^\r]*\n$)")))
      << s.err;
  EXPECT_EQ(done[1], done[2]) << s.err;
  auto k = nlohmann::json::parse(c.out);
  EXPECT_EQ(k["logits"].size(), 4u);
  EXPECT_EQ(k["logits"][0].size(), 3u);
  EXPECT_EQ(k["labels"].size(), 4u);
}

// The runner's JSON carries the same numbers as the engine: one committed reference end to end.
TEST_F(CliTest, LogitsJsonMatchesTransformers) {
  const auto dir =
      std::filesystem::path(GEMMA2_SOURCE_DIR) / "tests/data/references/gqa4_window_published";
  const auto ref = testing::LoadReference(dir);
  std::string ids;
  for (int32_t id : ref.prompt_ids) {
    if (!ids.empty()) ids += ',';
    ids += std::to_string(id);
  }
  const ProcessResult r =
      Exec("gemma2-run --model " + dir.string() + " --tp 2 --ignore-eos --logits --prompt-ids " +
           ids + " --max-new-tokens " + std::to_string(ref.generated_ids.size()));
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["generated_ids"].get<std::vector<int32_t>>(), ref.generated_ids);
  ASSERT_EQ(static_cast<int64_t>(j["logits"].size()), ref.rows);
  for (int64_t row = 0; row < ref.rows; ++row) {
    const auto v = j["logits"][row].get<std::vector<float>>();
    ASSERT_EQ(static_cast<int64_t>(v.size()), ref.width);
    EXPECT_LE(testing::RelativeL2(v.data(), ref.logits.data() + row * ref.width, ref.width), 1e-4)
        << row;
  }
}

TEST_F(CliTest, BadInputEndsInOneLine) {
  const std::string bad_file = (dir_->path() / "corrupt").string();
  std::filesystem::create_directories(bad_file);
  std::filesystem::copy_file(dir_->path() / "ids" / "config.json", bad_file + "/config.json");
  const char kBadHeader[] = "\x07\0\0\0\0\0\0\0{\"a\":1}x";  // valid length, invalid entry
  testing::WriteFile(bad_file + "/model.safetensors",
                     std::string(kBadHeader, sizeof(kBadHeader) - 1));
  const std::vector<std::pair<std::string, std::string>> cases = {
      {Model("ids") + " --prompt-ids 2,50", "token id 50 is outside the vocabulary [0, 50)"},
      {Model("ids") + " --prompt-ids 2,-3", "token id -3"},
      {Model("ids") + " --prompt-ids 2,x", "'x' is not an integer"},
      {Model("ids") + " --prompt-ids 2 --tp 3", "cannot shard"},
      {Model("ids") + " --prompt hello", "no tokenizer.model"},
      {Model("lm") + " --prompt ''", "empty prompt"},
      {Model("ids") + " --prompt-ids 2 --bogus", "--bogus"},
      {Model("ids") + " --prompt-ids 2 --greedy --temperature 1", "cannot be combined"},
      {Model("ids") + " --prompt-ids 2 --temperature -1", "temperature"},
      {Model("ids") + " --prompt-ids 2 --backend cuda", "cuda"},
      {" --model /nonexistent --prompt-ids 2", "/nonexistent"},
      {" --model " + bad_file + " --prompt-ids 2",
       "corrupt/model.safetensors: tensor 'a': entry is not an object"},
      {Model("ids"), "exactly one of"},
  };
  for (const auto& [args, expect] : cases) {
    const ProcessResult r = Exec("gemma2-run" + args);
    EXPECT_NE(r.code, 0) << args;
    EXPECT_NE(r.err.find(expect), std::string::npos) << args << " -> " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << args << " -> " << r.err;
    EXPECT_TRUE(r.out.empty()) << args;
  }
}


}  // namespace
}  // namespace gemma2

namespace gemma2 {
namespace {

// The seconds of the cluster's timeouts (cli/options.h) refuse NaN, infinities and the range's
// outside by name, with the exit code of a bad flag.
TEST(CliTimeoutTest, TimeoutsRefuseWhatIsNotAFiniteNumberOfSecondsInRange) {
  for (const char* v : {"nan", "-nan", "inf", "-1", "0.05", "86401", "1e308", "abc"}) {
    const ProcessResult r = Exec(std::string("gemma2-launch --model x --step-timeout ") + v);
    EXPECT_EQ(r.code, 2) << v << ": " << r.err;
    EXPECT_NE(r.err.find("--step-timeout"), std::string::npos) << v << ": " << r.err;
  }
}

// Every program answers --version with its name, the version and the commit it was built from,
// and its --help shows the defaults.
TEST(CliVersionTest, EveryProgramSaysItsVersionAndShowsDefaults) {
  for (const std::string program :
       {"gemma2-run", "gemma2-launch", "gemma2-coordinator", "gemma2-worker", "gemma2-bench",
        "gemma2-client", "gemma2-make-checkpoint"}) {
    const ProcessResult v = Exec(program + " --version");
    EXPECT_EQ(v.code, 0) << program << v.err;
    EXPECT_TRUE(std::regex_search(v.out, std::regex("^" + program + " " + GEMMA2_VERSION_FOR_TESTS +
                                                     R"( \(commit ([0-9a-f]{12}(-dirty)?|unknown)\))")))
        << v.out;
    const ProcessResult h = Exec(program + " --help");
    EXPECT_EQ(h.code, 0) << program;
    EXPECT_NE(h.out.find("--version"), std::string::npos) << program;
  }
  EXPECT_NE(Exec("gemma2-launch --help").out.find("--control-port INT=29500"), std::string::npos);
}


// The layer order of docs/design.md holds for every include and link line of the tree, and the
// check catches what breaks it: copies of the sources with one wrong edge planted each.
class LayersTest : public ::testing::Test {
 protected:
  // The source folders and docs/design.md, copied under a fresh directory.
  static std::filesystem::path CopyTree(const testing::TempDir& dir) {
    namespace fs = std::filesystem;
    const fs::path src = GEMMA2_SOURCE_DIR, dst = dir.path() / "tree";
    fs::create_directories(dst / "docs");
    fs::copy_file(src / "docs" / "design.md", dst / "docs" / "design.md");
    for (const auto& e : fs::directory_iterator(src)) {
      const std::string name = e.path().filename().string();
      if (!e.is_directory() || name[0] == '.' || name == "tests" || name == "docs" ||
          name == "bench" || name.rfind("build", 0) == 0 || name.rfind(".gpu", 0) == 0)
        continue;
      fs::copy(e.path(), dst / name, fs::copy_options::recursive);
    }
    return dst;
  }
  static void Append(const std::filesystem::path& file, const std::string& line) {
    std::ofstream(file, std::ios::app) << line << "\n";
  }
};

TEST_F(LayersTest, TheTreeFollowsTheDiagram) {
  const ProcessResult r = Exec(std::string("gemma2-check-layers ") + GEMMA2_SOURCE_DIR);
  EXPECT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("follows docs/design.md"), std::string::npos) << r.out;
}

TEST_F(LayersTest, APlantedEdgeFailsTheCheck) {
  struct Plant {
    std::string file, line, expect;
  };
  const Plant plants[] = {
      {"model/config.h", "#include \"serving/scheduler.h\"",
       "model/ includes serving/ (uses a layer above it)"},
      {"cpu/cpu_backend.cc", "#include \"cuda/cuda_backend.h\"",
       "cpu/ includes cuda/ (peers on one level)"},
      {"rpc/wire.h", "#include \"engine/engine.h\"", "rpc/ includes engine/"},
      {"coordinator/CMakeLists.txt", "target_link_libraries(gemma2_coordinator PUBLIC gemma2_serving)",
       "gemma2_coordinator links gemma2_serving of serving/"},
      {"newfolder/x.h", "#pragma once", "newfolder/: holds sources but is not in"},
  };
  for (const Plant& p : plants) {
    testing::TempDir dir;
    const std::filesystem::path tree = CopyTree(dir);
    std::filesystem::create_directories((tree / p.file).parent_path());
    Append(tree / p.file, p.line);
    const ProcessResult r = Exec("gemma2-check-layers " + tree.string());
    EXPECT_EQ(r.code, 1) << p.file << ": " << r.out << r.err;
    EXPECT_NE(r.out.find(p.expect), std::string::npos) << r.out;
  }
}

// tools/precision_table.py on two committed gemma2-bench files: each shape's row carries each
// file's ms per step with its TB/s (decode) or TFLOP/s (prefill) and fraction of the ceiling, as
// the files hold them, and the issue's target; the SVG has a bar per value; a missing file is one
// line and exit 1.
TEST(ToolScriptsTest, PrecisionTableCarriesTheBenchFilesNumbers) {
  int has_python = 1;
  Shell("command -v python3 >/dev/null", &has_python);
  if (has_python != 0) GTEST_SKIP() << "no python3 here";
  testing::TempDir dir;
  const std::string src = GEMMA2_SOURCE_DIR, out = (dir.path() / "t").string();
  const std::string bf16 = src + "/bench/results/2026-12-03-27b-h200-bf16.json",
                    fp8 = src + "/bench/results/2026-12-03-27b-h200-fp8.json";
  auto run = [&](const std::string& args, int* code) {
    return Shell("python3 " + src + "/tools/precision_table.py " + args + " 2>&1", code);
  };
  int code = -1;
  const std::string printed = run("--out " + out + " bf16=" + bf16 + " fp8=" + fp8, &code);
  ASSERT_EQ(code, 0) << printed;
  std::stringstream md;
  md << std::ifstream(out + ".md").rdbuf();
  EXPECT_EQ(md.str(), printed);
  int cells = 0;
  for (const std::string& file : {bf16, fp8}) {
    const auto results = nlohmann::json::parse(std::ifstream(file))["results"];
    for (const auto& r : results) {
      char want[96];
      if (r["kind"] == "decode") {
        std::snprintf(want, sizeof(want), "%.2f (%.2f TB/s %.0f%%)", r["ms_per_step"].get<double>(),
                      r["hbm_tb_per_s"].get<double>(),
                      100 * r["hbm_ceiling_fraction"].get<double>());
      } else {
        std::snprintf(want, sizeof(want), "%.2f (%.0f TF/s %.0f%%)", r["ms"].get<double>(),
                      r["tflops"].get<double>(), 100 * r["gemm_ceiling_fraction"].get<double>());
      }
      EXPECT_NE(md.str().find(want), std::string::npos) << want << "\n" << md.str();
      ++cells;
    }
  }
  EXPECT_NE(md.str().find("| decode b64 p2048 | "), std::string::npos);
  EXPECT_NE(md.str().find("| <= 15 |"), std::string::npos) << md.str();
  std::stringstream svg;
  svg << std::ifstream(out + ".svg").rdbuf();
  int rects = 0;
  for (size_t at = svg.str().find("<rect"); at != std::string::npos;
       at = svg.str().find("<rect", at + 1)) {
    ++rects;
  }
  EXPECT_EQ(rects, cells + 2) << "a bar per value and a legend box per file";
  const std::string missing = run("--out " + out + " x=/nonexistent.json", &code);
  EXPECT_EQ(code, 1);
  EXPECT_EQ(std::count(missing.begin(), missing.end(), '\n'), 1) << missing;
}

// tools/trace_summary.py on what a killed server leaves (the array open, the last event cut
// mid-write): the whole events read; random bytes, JSON that is no trace and a missing file are
// one line and exit 1.
TEST(ToolScriptsTest, TraceSummaryReadsACutTraceAndRefusesOthers) {
  int has_python = 1;
  Shell("command -v python3 >/dev/null", &has_python);
  if (has_python != 0) GTEST_SKIP() << "no python3 here";
  testing::TempDir dir;
  const std::string script = std::string(GEMMA2_SOURCE_DIR) + "/tools/trace_summary.py ";
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir.path() / name) << text;
    return (dir.path() / name).string();
  };
  std::string cut = "[\n";
  for (int i = 1; i <= 3; ++i) {
    cut += R"({"name":"step","ph":"X","ts":)" + std::to_string(i * 100) +
           R"(,"dur":50,"args":{"step":)" + std::to_string(i) +
           R"(,"sequences":2,"tokens":2,"outputs":2}},)" + "\n";
  }
  cut += R"({"name":"step","ph":"X","ts":400,"du)";
  int code = -1;
  const std::string out = Shell("python3 " + script + write("cut.json", cut) + " 2>&1", &code);
  EXPECT_EQ(code, 0) << out;
  EXPECT_EQ(out.rfind("3 steps over ", 0), 0u) << out;
  std::string noise(4096, '\0');
  for (size_t i = 0; i < noise.size(); ++i) noise[i] = static_cast<char>((i * 2654435761u) >> 7);
  for (const std::string& bad : {write("noise.bin", noise), write("list.json", "[1, 2, 3]"),
                                 write("keys.json", R"([{"name": "step"}])"),
                                 (dir.path() / "missing.json").string()}) {
    const std::string said = Shell("python3 " + script + bad + " 2>&1", &code);
    EXPECT_EQ(code, 1) << bad << ": " << said;
    EXPECT_EQ(std::count(said.begin(), said.end(), '\n'), 1) << said;
  }
}

}  // namespace
}  // namespace gemma2

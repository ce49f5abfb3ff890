// gemma2-check-layers ROOT: checks the include and link edges of the sources under ROOT against
// the layer order drawn once, in ROOT/docs/design.md (its ```layers block: one line per level,
// top first, the folders on a line peers). A file may include a header of its own folder or of a
// folder on a lower line; a folder's CMakeLists.txt may link the libraries defined by such
// folders. tests/ may use every layer. Every folder holding sources must be in the diagram.
// Prints each forbidden edge with its file and line; exit 0: none, 1: some, 2: unreadable.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

struct Layers {
  std::map<std::string, int> level;  // folder -> line in the diagram (0: top)
};

bool ReadLayers(const fs::path& design, Layers* out, std::string* error) {
  std::ifstream in(design);
  if (!in) {
    *error = "cannot read " + design.string();
    return false;
  }
  bool inside = false;
  int line_no = 0;
  for (std::string line; std::getline(in, line);) {
    if (!inside) {
      inside = line.rfind("```layers", 0) == 0;
      continue;
    }
    if (line.rfind("```", 0) == 0) return !out->level.empty();
    // Leading words ending in '/' are the level's folders; the rest of the line describes them.
    std::istringstream words(line);
    bool any = false;
    for (std::string w; words >> w && w.size() > 1 && w.back() == '/';) {
      w.pop_back();
      if (out->level.count(w)) {
        *error = design.string() + ": folder " + w + "/ is drawn twice";
        return false;
      }
      out->level[w] = line_no;
      any = true;
    }
    if (any) ++line_no;
  }
  *error = design.string() + ": no ```layers block";
  return false;
}

bool IsSource(const fs::path& p) {
  const std::string e = p.extension().string();
  return e == ".h" || e == ".cc" || e == ".cu" || e == ".cuh";
}

// Top-level folders that hold sources (tests/ and build trees aside).
std::set<std::string> SourceFolders(const fs::path& root) {
  std::set<std::string> folders;
  for (const auto& entry : fs::directory_iterator(root)) {
    if (!entry.is_directory()) continue;
    const std::string name = entry.path().filename().string();
    if (name.empty() || name[0] == '.' || name == "tests" || name.rfind("build", 0) == 0) continue;
    for (const auto& f : fs::recursive_directory_iterator(entry.path())) {
      if (f.is_regular_file() && IsSource(f.path()) &&
          f.path().string().find("node_modules") == std::string::npos) {
        folders.insert(name);
        break;
      }
    }
  }
  return folders;
}

// Whether `user` may depend on `used`: its own folder, a lower level, or a user of every layer.
bool Allowed(const Layers& layers, const std::string& user, const std::string& used) {
  if (user == used || user == "tests") return true;
  return layers.level.at(used) > layers.level.at(user);
}

std::string Describe(const Layers& layers, const std::string& user, const std::string& used) {
  const int u = layers.level.at(user), d = layers.level.at(used);
  return std::string(u == d ? "peers on one level" : "uses a layer above it");
}

}  // namespace

namespace {
int Check(int argc, char** argv);
}  // namespace

// An unreadable tree (a directory without permission, a vanished file) is an error, not a crash.
int main(int argc, char** argv) {
  try {
    return Check(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gemma2-check-layers: error: %s\n", e.what());
    return 2;
  }
}

namespace {
int Check(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: gemma2-check-layers SOURCE_ROOT\n");
    return 2;
  }
  const fs::path root = argv[1];
  Layers layers;
  std::string error;
  if (!ReadLayers(root / "docs" / "design.md", &layers, &error)) {
    std::fprintf(stderr, "gemma2-check-layers: error: %s\n", error.c_str());
    return 2;
  }
  int bad = 0;
  const std::set<std::string> folders = SourceFolders(root);
  for (const std::string& f : folders) {
    if (!layers.level.count(f)) {
      std::printf("%s/: holds sources but is not in docs/design.md's layers\n", f.c_str());
      ++bad;
    }
  }
  layers.level.emplace("tests", -1);

  // Include edges.
  const std::regex include(R"(^\s*#\s*include\s*"([A-Za-z0-9_]+)/)");
  std::vector<std::string> users(folders.begin(), folders.end());
  users.push_back("tests");
  for (const std::string& user : users) {
    if (!fs::exists(root / user) || !layers.level.count(user)) continue;
    for (const auto& f : fs::recursive_directory_iterator(root / user)) {
      if (!f.is_regular_file() || !IsSource(f.path())) continue;
      if (f.path().string().find("node_modules") != std::string::npos) continue;
      std::ifstream in(f.path());
      int n = 0;
      for (std::string line; std::getline(in, line);) {
        ++n;
        std::smatch m;
        if (!std::regex_search(line, m, include)) continue;
        const std::string used = m[1];
        if (!layers.level.count(used)) continue;  // not a folder of this tree
        if (Allowed(layers, user, used)) continue;
        std::printf("%s:%d: %s/ includes %s/ (%s): %s\n",
                    fs::relative(f.path(), root).string().c_str(), n, user.c_str(), used.c_str(),
                    Describe(layers, user, used).c_str(), line.c_str());
        ++bad;
      }
    }
  }

  // Link edges: the folder defining each library, then what each folder's targets link.
  const std::regex add_library(R"(add_library\(\s*([A-Za-z0-9_]+))");
  const std::regex link(R"(target_link_libraries\(([^)]*)\))");
  std::map<std::string, std::string> library_folder;
  std::map<std::string, std::string> cmake_text;
  for (const std::string& user : users) {
    std::ifstream in(root / user / "CMakeLists.txt");
    if (!in) continue;
    std::stringstream ss;
    ss << in.rdbuf();
    cmake_text[user] = ss.str();
    const std::string& text = cmake_text[user];
    for (std::sregex_iterator it(text.begin(), text.end(), add_library), end; it != end; ++it)
      library_folder[(*it)[1]] = user;
  }
  for (const auto& [user, text] : cmake_text) {
    for (std::sregex_iterator it(text.begin(), text.end(), link), end; it != end; ++it) {
      std::istringstream words((*it)[1].str());
      std::string target;
      words >> target;  // the linking target (defined in this folder)
      for (std::string w; words >> w;) {
        auto lib = library_folder.find(w);
        if (lib == library_folder.end()) continue;
        if (Allowed(layers, user, lib->second)) continue;
        std::printf("%s/CMakeLists.txt: %s links %s of %s/ (%s)\n", user.c_str(), target.c_str(),
                    w.c_str(), lib->second.c_str(), Describe(layers, user, lib->second).c_str());
        ++bad;
      }
    }
  }
  if (bad > 0) {
    std::printf("%d edge(s) against the layers of docs/design.md\n", bad);
    return 1;
  }
  std::printf("layers: every include and link edge of %zu folders follows docs/design.md\n",
              folders.size());
  return 0;
}
}  // namespace

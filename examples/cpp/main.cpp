// Reads a cp-onnx report.json (format "cp-onnx-report", version 2) and prints the default prediction's decision for
// each prompting regime, the top circuits of each method and the per-layer statistics, in exactly the format of
// `cp-onnx report REPORT --text`.
//
//   report_reader REPORT.json [TOP]
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

using json = nlohmann::ordered_json;  // keeps the report's key order (methods, statistics)

namespace {

// %.6g as Python's "%.6g" writes it; JSON null (a non-finite number in the analysis) as n/a.
std::string number(const json& value) {
  if (value.is_null()) return "n/a";
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.6g", value.get<double>());
  return buffer;
}

std::string format(const char* pattern, double value) {  // sized to fit: a gain of 1e300 prints 300 digits
  std::string text(std::snprintf(nullptr, 0, pattern, value) + 1, '\0');
  std::snprintf(text.data(), text.size(), pattern, value);
  text.pop_back();
  return text;
}

std::string span(const json& block) {
  return "[" + std::to_string(block["start"].get<int>()) + ", " + std::to_string(block["end"].get<int>()) + ")";
}

bool has_string(const json& object, const char* key) {
  return object.contains(key) && object[key].is_string() && !object[key].get<std::string>().empty();
}

bool has_number(const json& object, const char* key) { return object.contains(key) && object[key].is_number(); }

// The decided (or least harmful) block on each kind of calibration text: cp_onnx/outputs/embed.py's kind_lines.
void print_kinds(const json& prediction) {
  if (!prediction.contains("kinds") || !prediction["kinds"].is_object()) return;
  const json& kinds = prediction["kinds"];
  if (!kinds.contains("blocks") || !kinds["blocks"].is_array()) return;
  for (const json& block : kinds["blocks"]) {
    if (!block.is_object() || !block.contains("by_kind") || !block["by_kind"].is_object() || block["by_kind"].empty()) continue;
    std::printf("kinds %d:%d\n", block["start"].get<int>(), block["end"].get<int>());
    for (const auto& [kind, gain] : block["by_kind"].items()) {
      const std::string verdict = has_string(gain, "verdict") ? gain["verdict"].get<std::string>() : "unclear";
      auto field = [&gain](const char* key) { return number(gain.contains(key) ? gain[key] : json()); };
      std::string line = "  " + verdict + " gain " + field("gain") + " bounds " + field("lower") + " " + field("upper") + " texts " +
                         field("texts") + " numbers " + field("with_numbers") + " kind " + kind;
      for (char& c : line)
        if (c == '\r' || c == '\n') c = ' ';
      std::printf("%s\n", line.c_str());
    }
    return;  // the first block that has them: the decision's
  }
}

const char* const REGIMES[] = {"zero_shot", "few_shot"};  // cp_onnx/regimes.py's REGIMES, in order

std::string label(const std::string& regime) { return regime == "zero_shot" ? "zero-shot" : regime == "few_shot" ? "few-shot" : regime; }

// One regime's decision in one line: cp_onnx/outputs/decision.py's decision_line, branch for branch.
std::string decision_line(const json& prediction, const std::string& regime) {
  const json empty = json::array();
  const json& candidates = prediction.contains("candidates") && prediction["candidates"].is_array() ? prediction["candidates"] : empty;
  std::string figures;  // gain, lower bound and general-text cost of the first candidate, when the report has them
  if (!candidates.empty() && has_number(prediction, "predicted_gain") && has_number(prediction, "gain_lower_bound")) {
    const json& metrics = candidates[0].contains("metrics") ? candidates[0]["metrics"] : json::object();
    const std::string cost = has_number(metrics, "general_nll_change") ? format("%+.4f", metrics["general_nll_change"].get<double>()) : "n/a";
    const std::string level = has_number(prediction, "confidence")
        ? "lower " + format("%.0f%%", 100 * prediction["confidence"].get<double>()) + " bound" : "lower bound";
    const std::string per = has_string(prediction, "gain_per") ? prediction["gain_per"].get<std::string>() : "digit token";
    figures = "gain " + format("%+.4f", prediction["predicted_gain"].get<double>()) + " nats per " + per + " (" + level + " " +
              format("%+.4f", prediction["gain_lower_bound"].get<double>()) + "), cost on general text " + cost + " nats per token";
  }
  std::string scope = has_string(prediction, "metric") ? "metric " + prediction["metric"].get<std::string>() : "metric not recorded";
  scope += ", method " + (has_string(prediction, "method") ? prediction["method"].get<std::string>() : std::string("duplication_loss"));
  std::string line;
  const json& block = prediction.contains("block") ? prediction["block"] : json();
  if (prediction.value("decision", "") == "help" && block.is_object()) {
    const int first = block["start"].get<int>(), last = block["end"].get<int>() - 1;
    line = label(regime) + " decision: duplicate " + span(block) + " (" +
           (first == last ? "layer " + std::to_string(first) : "layers " + std::to_string(first) + " to " + std::to_string(last)) + " run twice)";
    if (!figures.empty()) line += "; " + figures;
  } else {
    line = label(regime) + " decision: no block is predicted to help";
    if (has_string(prediction, "reason")) line += " (" + prediction["reason"].get<std::string>() + ")";
    if (!candidates.empty()) {
      line += "; least harmful ";
      for (std::size_t k = 0; k < candidates.size(); ++k) line += (k ? ", " : "") + span(candidates[k]);
    }
    if (!figures.empty()) line += "; top " + figures;
  }
  line += "; " + scope;
  for (char& c : line)  // a line break in a hand-edited string would split the one-line answer
    if (c == '\n' || c == '\r') c = ' ';
  return line;
}

// The report's predictions in REGIMES order (those that are objects).
std::vector<std::pair<std::string, const json*>> predictions(const json& report) {
  std::vector<std::pair<std::string, const json*>> found;
  if (!report.contains("predictions") || !report["predictions"].is_object()) return found;
  for (const char* regime : REGIMES)
    if (report["predictions"].contains(regime) && report["predictions"][regime].is_object())
      found.emplace_back(regime, &report["predictions"][regime]);
  return found;
}

int fail(const std::string& message) {
  std::cerr << "report_reader: error: " << message << "\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) return fail("usage: report_reader REPORT.json [TOP]");
  const long top = argc == 3 ? std::strtol(argv[2], nullptr, 10) : 5;
  if (top < 1) return fail("TOP must be a positive number");

  std::ifstream file(argv[1]);
  if (!file) return fail(std::string("cannot open ") + argv[1]);
  json report;
  try {
    report = json::parse(file);
  } catch (const json::parse_error& error) {
    return fail(std::string(argv[1]) + " is not valid JSON: " + error.what());
  }
  if (report.value("format", "") != "cp-onnx-report" || report.value("version", 0) != 2)
    return fail(std::string(argv[1]) + " is not a cp-onnx report of version 2");

  const json& model = report["model"];
  const int layers = model["num_layers"].get<int>();
  const auto found = predictions(report);
  if (found.empty())
    std::printf("decision: none: this report holds no default prediction (duplication_loss was skipped or not run), so no block "
                "is recommended; its rankings are not recommendations\n");
  for (const auto& [regime, prediction] : found) std::printf("%s\n", decision_line(*prediction, regime).c_str());  // the answers first
  std::printf("model %s\nlayers %d\n", model["name"].get<std::string>().c_str(), layers);
  for (const auto& [regime, prediction] : found) {  // each regime's decision, for line-based readers
    const json& block = prediction->contains("block") ? (*prediction)["block"] : json();
    if (prediction->value("decision", "") == "help" && block.is_object())
      std::printf("prediction %s help %d:%d\n", regime.c_str(), block["start"].get<int>(), block["end"].get<int>());
    else
      std::printf("prediction %s abstain\n", regime.c_str());
    print_kinds(*prediction);
  }

  for (const auto& [method, entry] : report["methods"].items()) {
    std::printf("method %s\n", method.c_str());
    long rank = 0;
    for (const json& block : entry["blocks"]) {
      if (++rank > top) break;
      const int start = block["start"].get<int>(), end = block["end"].get<int>();
      std::printf("  %ld [%d, %d) %.1f-%.1f%% score %s\n", rank, start, end, 100.0 * start / layers,
                  100.0 * end / layers, number(block["score"]).c_str());
    }
  }

  if (report.contains("pruning") && report["pruning"].is_object()) {  // pruning candidates, when analyze --prune made them
    const json& pruning = report["pruning"];
    if (pruning.contains("layers"))
      for (const auto& [method, entry] : pruning["layers"]["methods"].items())
        for (const json& choice : entry["choices"]) {
          std::string layers;
          for (const json& layer : choice["layers"]) layers += (layers.empty() ? "" : ",") + std::to_string(layer.get<int>());
          std::printf("prune %s %d %s\n", method.c_str(), choice["n"].get<int>(), layers.c_str());
        }
    if (pruning.contains("heads"))
      for (const auto& [method, entry] : pruning["heads"]["methods"].items()) {
        long rank = 0;
        for (const json& head : entry["cheapest"]) {
          if (++rank > 5) break;
          std::printf("prune_head %s %d %d\n", method.c_str(), head["layer"].get<int>(), head["head"].get<int>());
        }
      }
  }

  std::printf("per-layer statistics\n");
  for (const json& row : report["layers"]) {
    std::printf("  layer %d", row["layer"].get<int>());
    for (const auto& [name, value] : row.items())
      if (name != "layer") std::printf(" %s=%s", name.c_str(), number(value).c_str());
    std::printf("\n");
  }
  return 0;
}

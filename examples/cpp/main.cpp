// Reads a cp-onnx report.json (format "cp-onnx-report", version 1) and prints the top circuits of each
// method and the per-layer statistics, in exactly the format of `cp-onnx report REPORT --text`.
//
//   report_reader REPORT.json [TOP]
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>

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
  if (report.value("format", "") != "cp-onnx-report" || report.value("version", 0) != 1)
    return fail(std::string(argv[1]) + " is not a cp-onnx report of version 1");

  const json& model = report["model"];
  const int layers = model["num_layers"].get<int>();
  std::printf("model %s\nlayers %d\n", model["name"].get<std::string>().c_str(), layers);
  if (report.contains("prediction") && report["prediction"].is_object()) {  // the default method's decision
    const json& prediction = report["prediction"];
    const json& block = prediction["block"];
    if (prediction.value("decision", "") == "help" && block.is_object())
      std::printf("prediction help %d:%d\n", block["start"].get<int>(), block["end"].get<int>());
    else
      std::printf("prediction abstain\n");
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

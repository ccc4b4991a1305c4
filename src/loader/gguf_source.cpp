#include <filesystem>

#include "core/error.h"
#include "formats/gguf.h"
#include "loader/model_source.h"

namespace shardlm {

std::unique_ptr<ModelSource> open_hf_model_source(const std::string& dir);  // loader/hf_source.cpp

namespace {

class GgufModelSource final : public ModelSource {
 public:
  explicit GgufModelSource(const std::string& path) : file_(GgufFile::open(path)) {
    config_ = config_from_gguf(*file_);
    for (const GgufTensorInfo& t : file_->tensors()) {
      SourceTensor s;
      s.name = t.name;
      s.type = t.type;
      s.n_dims = t.n_dims;
      s.ne = t.ne;
      s.data = file_->tensor_data(t);
      s.n_bytes = t.n_bytes;
      tensors_.push_back(s);
    }
    if (file_->find("tokenizer.ggml.tokens")) vocab_ = std::make_unique<Vocab>(vocab_from_gguf(*file_));
    chat_template_ = file_->get_string("tokenizer.chat_template").value_or("");
  }
  const ModelConfig& config() const override { return config_; }
  const std::vector<SourceTensor>& tensors() const override { return tensors_; }
  const Vocab* vocab() const override { return vocab_.get(); }
  std::string chat_template() const override { return chat_template_; }
  std::string format_name() const override { return "gguf"; }
  std::string path() const override { return file_->path(); }

 private:
  std::unique_ptr<GgufFile> file_;
  ModelConfig config_;
  std::vector<SourceTensor> tensors_;
  std::unique_ptr<Vocab> vocab_;
  std::string chat_template_;
};

}  // namespace

const SourceTensor* ModelSource::find_tensor(const std::string& name) const {
  for (const SourceTensor& t : tensors())
    if (t.name == name) return &t;
  return nullptr;
}

const SourceTensor& ModelSource::tensor(const std::string& name) const {
  const SourceTensor* t = find_tensor(name);
  if (!t) fail(path(), ": tensor '", name, "' is missing");
  return *t;
}

std::unique_ptr<ModelSource> open_model_source(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) fail_kind(ErrorKind::kIo, "model '", path, "' does not exist");
  if (std::filesystem::is_directory(path, ec)) return open_hf_model_source(path);
  return std::make_unique<GgufModelSource>(path);
}

}  // namespace shardlm

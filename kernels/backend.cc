#include "kernels/backend.h"

#include <cstdlib>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace kvgate::kernels {

std::string Device::ToString() const {
  switch (type) {
    case Type::kCpu:
      return "cpu";
    case Type::kGuarded:
      return "guarded";
    case Type::kCuda:
      return absl::StrCat("cuda:", index);
  }
  return "?";
}

absl::StatusOr<Device> Device::Parse(const std::string& text) {
  if (text == "cpu") return Device{Type::kCpu, 0};
  if (text == "guarded") return Device{Type::kGuarded, 0};
  if (text == "cuda") return Device{Type::kCuda, 0};
  if (text.rfind("cuda:", 0) == 0) {
    int index = -1;
    if (absl::SimpleAtoi(text.substr(5), &index) && index >= 0) return Device{Type::kCuda, index};
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--device '", text, "' is not one of cpu, cuda, cuda:N, guarded"));
}

absl::StatusOr<Device> Device::ParseOrDefault(const std::string& text) {
  return Parse(text.empty() ? DefaultDeviceName() : text);
}

std::string DefaultDeviceName() {
  const char* env = std::getenv("KVGATE_DEVICE");
  return env != nullptr && env[0] != '\0' ? std::string(env) : std::string("cpu");
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    Reset();
    owner_ = std::exchange(o.owner_, nullptr);
    data_ = std::exchange(o.data_, nullptr);
    count_ = std::exchange(o.count_, 0);
    dtype_ = o.dtype_;
  }
  return *this;
}

void DeviceBuffer::Reset() {
  if (data_ != nullptr && owner_ != nullptr) owner_->Free(data_, bytes());
  data_ = nullptr;
  owner_ = nullptr;
  count_ = 0;
}

absl::StatusOr<WeightView> Backend::Upload(const WeightView& host, DeviceBuffer* storage) {
  if (host.empty() || host_accessible()) return host;
  if (host.quant != Quant::kNone) {
    // Blocks are bytes, stored in whole float32 elements (the guarded backend's CPU kernels read
    // them; a backend without quantized kernels refused them at load).
    auto buf = Alloc((host.bytes() + 3) / 4, DType::kF32);
    if (!buf.ok()) return buf.status();
    *storage = *std::move(buf);
    if (absl::Status s =
            CopyToDevice(storage->data(), host.data, static_cast<size_t>(host.bytes()));
        !s.ok()) {
      return s;
    }
    WeightView out = host;
    out.data = storage->data();
    return out;
  }
  auto buf = Alloc(host.rows * host.cols, host.dtype);
  if (!buf.ok()) return buf.status();
  *storage = *std::move(buf);
  if (absl::Status s = CopyToDevice(storage->data(), host.data, storage->bytes()); !s.ok()) {
    return s;
  }
  return WeightView{storage->data(), host.dtype, host.rows, host.cols};
}

}  // namespace kvgate::kernels
